"""Held-out samples during training (``run.sample_every=N``): every N steps (and at step 0, the base model), a small
fixed grid of held-out prompts x seeds is generated with the current weights and scored with the run's held-out
reward (:func:`directalign.eval.heldout.training_reward`).

The grid goes to ``samples/step-<N>.png`` (one row: each prompt's seeds side by side, prompt after prompt), the
point to ``heldout.jsonl`` (and to TensorBoard / W&B when they are on); the report shows the grids and draws the
points on the reward curve. The prompts are a spread of ``eval.prompts`` and the seeds the first ``eval.seeds``,
fixed for the whole run, so grids of different steps differ only by the weights. Sampling runs under
``torch.no_grad`` with the transformer in eval mode (no LoRA dropout) and draws only from its own seeded
generators, and every step re-seeds the global generator, so the training trajectory is the same with or without
samples. With EMA (``train.ema_decay``) the grids show the raw weights; the final evaluation shows the EMA ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .eval.heldout import eval_slots, training_reward
from .methods.sampling import generate
from .report_images import save_grid

MAX_PROMPTS = 4
MAX_SEEDS = 2


def pick_prompts(prompts: list[str], n: int = MAX_PROMPTS) -> list[str]:
    """``n`` prompts spread evenly over the list (all of them when there are fewer)."""
    if n <= 1:
        return list(prompts[:1])
    if len(prompts) <= n:
        return list(prompts)
    return [prompts[round(i * (len(prompts) - 1) / (n - 1))] for i in range(n)]


class HeldoutSamples:
    """``samples(step)``: the grid and reward point of ``step`` when it is a multiple of ``run.sample_every``.

    Every rank generates (a sharded transformer needs all of them); only the main rank scores and writes, through
    ``logger`` (a :class:`directalign.logging_utils.MetricsLogger`)."""

    def __init__(self, cfg, adapter, reward, eval_prompts: list[str], run_dir: Path, logger=None,
                 is_main: bool = True):
        self.cfg, self.adapter, self.reward, self.logger, self.is_main = cfg, adapter, reward, logger, is_main
        self.every = cfg.run.sample_every
        self.run_dir = Path(run_dir)
        self.prompts = pick_prompts(eval_prompts)
        self.seeds = list(cfg.eval.seeds[:MAX_SEEDS])

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def __call__(self, step: int) -> None:
        if not self.due(step):
            return
        t0 = time.time()
        slot_prompts, slot_seeds = eval_slots(self.prompts, self.seeds)
        transformer = self.adapter.transformer
        modes = {m: m.training for m in transformer.modules()}
        transformer.eval()
        e, m = self.cfg.eval, self.cfg.model
        try:
            with torch.no_grad():
                images = generate(self.adapter, slot_prompts, slot_seeds, e.steps, self.cfg.sampling.shift,
                                  e.guidance, m.height, m.width, e.batch_size)
        finally:
            for module, training in modes.items():
                module.training = training
        if not self.is_main:
            return
        reward = float(training_reward(self.reward, images, slot_prompts, self.cfg).mean())
        rel = Path("samples") / f"step-{step}.png"
        path = save_grid(images, self.run_dir / rel, ncol=len(slot_prompts))
        record = {"step": step, "reward": reward, "image": rel.as_posix(), "prompts": self.prompts,
                  "seeds": self.seeds, "seconds": round(time.time() - t0, 3)}
        if self.logger is not None:
            self.logger.write_heldout(record, path)
