"""The step loop: seeding, one method step, gradient reduction, clipping, non-finite handling, the optimizer and
EMA, logging, checkpoints and signals. It knows no method: it hands each step a :class:`StepContext` and reads back
a :class:`StepOutput`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import TrainingError
from ..logging_utils import MetricsLogger
from . import distributed as dist_utils
from .context import STREAM_TORCH_GLOBAL, PromptSampler, StepContext, StepOutput, seed_for
from .finetune import FineTuning
from .memory import precompute_prompt_embeddings, release_freed_memory, session_prompts
from .signals import StopFlag, StoppedBySignal


@dataclass
class LoopResult:
    step: int  # the number of steps done (the run's position)
    skipped: int  # steps whose loss or gradient was not finite


def reduce_output(out: StepOutput, info: dist_utils.DistInfo, device) -> StepOutput:
    """Means over ranks of the loss, the reward and every metric (the same keys on every rank, in sorted order)."""
    metrics = {k: dist_utils.all_reduce_mean(float(out.metrics[k]), info, device) for k in sorted(out.metrics)}
    return StepOutput(dist_utils.all_reduce_mean(float(out.loss), info, device),
                      dist_utils.all_reduce_mean(float(out.reward), info, device), metrics)


def clip_and_measure(params: list, grad_clip: float) -> float:
    """Clip the gradients to ``grad_clip`` (0: no clipping) and return their total norm before clipping."""
    if not any(p.grad is not None for p in params):
        return 0.0
    clip = grad_clip if grad_clip > 0 else float("inf")
    return float(dist_utils.full_tensor(torch.nn.utils.clip_grad_norm_(params, clip)))


class StepLoop:
    """Runs steps ``[start, end)`` of a method on one rank and writes checkpoints of the state they change."""

    def __init__(self, *, train_cfg, run_cfg, method, ft: FineTuning, sampler: PromptSampler, device,
                 run_dir: Path, checkpoint_state: Callable[[int], dict], extra_metrics: Callable[[], dict],
                 log=print, desc: str = "train", after_step: Callable[[int], None] | None = None,
                 precompute_prompts: bool = False):
        """``after_step(step_done)``: called on every rank after each step is logged and before its checkpoint
        (training uses it for the held-out samples of ``run.sample_every``); it must not touch the trainable state.
        ``precompute_prompts``: encode the session's prompts through ``method.adapter`` before the first step
        (:func:`.memory.precompute_prompt_embeddings`), for methods whose steps encode the sampler's prompts."""
        self.t, self.run_cfg, self.method, self.ft = train_cfg, run_cfg, method, ft
        self.sampler, self.device, self.run_dir = sampler, device, Path(run_dir)
        self.checkpoint_state, self.extra_metrics, self.log, self.desc = checkpoint_state, extra_metrics, log, desc
        self.info, self.after_step = ft.info, after_step
        self.precompute_prompts = precompute_prompts
        self._last_saved: int | None = None

    # ------------------------------------------------------------------------------------------------ pieces
    def save(self, step_done: int) -> Path | None:
        if self._last_saved == step_done:
            return None
        own = getattr(self.method, "state_dict", None)  # optional: a method's tensors that live across steps
        path = self.ft.save(self.run_dir / "checkpoints", step_done, self.checkpoint_state(step_done),
                            self.run_cfg.keep_checkpoints, method_state=own() if own is not None else None)
        self._last_saved = step_done
        return path

    def one_step(self, step: int) -> tuple[StepOutput, float, bool]:
        """One optimizer step; returns the reduced output, the gradient norm and whether it was finite."""
        t, info, ft = self.t, self.info, self.ft
        torch.manual_seed(seed_for(t.seed, info.rank, step, stream=STREAM_TORCH_GLOBAL))  # dropout inside LoRA
        ft.optimizer.zero_grad(set_to_none=True)
        ctx = StepContext(step=step, prompts=self.sampler.batch(step), seed=t.seed, rank=info.rank,
                          world_size=info.world_size, batch_size=t.batch_size)
        out = self.method.train_step(ctx, lambda loss: loss.backward())
        if not ft.fsdp:  # FSDP2 reduce-scatters the gradients during backward
            dist_utils.all_reduce_gradients(ft.params, info)
        grad_norm = clip_and_measure(ft.params, t.grad_clip)
        out = reduce_output(out, info, self.device)
        finite = math.isfinite(out.loss) and math.isfinite(grad_norm)
        if finite:
            ft.optimizer.step()
            ft.update_ema()
            # as the official train_one_step: the gradients are freed with the step, not kept alive through the
            # logging, held-out samples and checkpoint between steps
            ft.optimizer.zero_grad(set_to_none=True)
        else:
            ft.optimizer.zero_grad(set_to_none=True)
            if t.on_nonfinite == "abort":
                raise TrainingError(f"non-finite loss or gradient at step {step}; lower train.learning_rate or set "
                                    "train.on_nonfinite=skip")
        ft.scheduler.step()
        return out, grad_norm, finite

    # ------------------------------------------------------------------------------------------------ the loop
    def run(self, start: int, end: int, resumed: bool, metrics: MetricsLogger | None) -> LoopResult:
        info, t = self.info, self.t
        self._last_saved = start if resumed else None  # the resumed checkpoint is not written again
        stop = StopFlag().install()
        nfe = self.method.nfe(t.batch_size)
        progress = None
        if self.run_cfg.progress and info.is_main:
            from tqdm.auto import tqdm

            progress = tqdm(total=t.steps, initial=start, desc=self.desc, unit="step", dynamic_ncols=True)
        step, skipped = start, 0
        if self.precompute_prompts and getattr(self.method, "adapter", None) is not None:
            precompute_prompt_embeddings(self.method.adapter, session_prompts(self.sampler, start, end), t.batch_size)
        try:
            while step < end:
                t_step = time.time()
                out, grad_norm, finite = self.one_step(step)
                skipped += not finite
                step += 1
                if step == start + 1:  # the first step frees most (warm-up, optimizer state): give it back
                    release_freed_memory()
                record = {"step": step, "loss": out.loss, "reward": out.reward, "grad_norm": grad_norm,
                          "lr": self.ft.scheduler.get_last_lr()[0], "step_seconds": time.time() - t_step,
                          "skipped": not finite, **nfe, **out.metrics, **self.extra_metrics()}
                if metrics is not None and (step % self.run_cfg.log_every == 0 or step == end or not finite):
                    metrics.write(record)
                if not finite and info.is_main:
                    self.log(f"step {step}: non-finite loss or gradient; step skipped")
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{out.loss:.4f}", reward=f"{out.reward:.4f}",
                                         s_step=f"{record['step_seconds']:.2f}")
                if self.after_step is not None:
                    self.after_step(step)
                    if self.run_cfg.sample_every and step % self.run_cfg.sample_every == 0:
                        release_freed_memory()  # the held-out samples' rollouts and decodes
                if self.run_cfg.checkpoint_every and step % self.run_cfg.checkpoint_every == 0 and step < end:
                    self.save(step)
                if stop.signal is not None:
                    self.save(step)  # no-op when this step was just checkpointed
                    # The exception carries the one message ("stopped by SIGINT after step N; ..."): the CLI prints
                    # it once, after the progress bar below is closed, so it starts a line of its own.
                    raise StoppedBySignal(stop.signal, step)
            self.save(step)
        finally:
            if progress is not None:
                progress.close()
            stop.uninstall()
        return LoopResult(step, skipped)
