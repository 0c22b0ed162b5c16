"""What many tests share: the repository paths, the one tiny-config helper, and the pieces of a training step.

``tiny_config(method, *overrides, run_dir=...)`` is the only place that knows how to make each method cheap on the
tiny world (2-3 sampling steps, a small LoRA, no base evaluation, no progress bar): tests add only the settings they
are about.
"""

from __future__ import annotations

from pathlib import Path

import torch

from directalign.adapters.loading import load_adapter
from directalign.config import build_config
from directalign.engine.context import StepContext
from directalign.engine.finetune import DTYPES, apply_finetune_mode
from directalign.methods.registry import METHODS
from directalign.rewards.registry import load_reward

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
DATA = REPO / "tests" / "data"
PROMPTS = ["a red circle on a blue background", "a green square on a yellow background"]

# Each method at a few model calls per step on the tiny world.
CHEAP = {
    "srpo": ["srpo.rollout_steps=2", "srpo.grid_points=40", "srpo.window_margin=2"],
    "direct-align": ["srpo.rollout_steps=2", "srpo.grid_points=40", "srpo.window_margin=2",
                     "srpo.inversion_branch=false", "srpo.hinge_threshold=5.0"],
    "refl": ["refl.rollout_steps=3", "refl.step_range=[1,2]", "refl.hinge_threshold=5.0"],
    "draft-k": ["draft.sampling_steps=3", "draft.k=2"],
    "draft-lv": ["draft.sampling_steps=3", "draft.lv_samples=2"],
    "alignprop": ["alignprop.sampling_steps=3", "alignprop.truncation=uniform", "alignprop.uniform=[0,1]"],
    "grpo": ["grpo.sampling_steps=3", "grpo.group_size=2", "grpo.timestep_fraction=1.0", "train.batch_size=1"],
    "grpo-fast": ["grpo_fast.sampling_steps=4", "grpo_fast.group_size=2", "grpo_fast.sde_window_size=1",
                  "grpo_fast.sde_window_range=[0,2]", "train.batch_size=1"],
    "nft": ["nft.rollout_steps=3", "nft.group_size=2", "nft.timestep_fraction=0.5", "train.batch_size=1"],
    "dpo": ["dpo.sampler=ode", "dpo.sampling_steps=2", "dpo.group_size=2"],
    "awm": ["awm.sampling_steps=3", "awm.group_size=2", "awm.train_timesteps=2", "awm.timestep_fraction=1.0"],
}
COMMON = ["train.batch_size=2", "train.finetune=lora", "train.lora_rank=4", "train.lora_alpha=8",
          "train.learning_rate=1e-3", "train.grad_clip=1.0", "eval.before=false", "run.progress=false",
          "run.report=false", "eval.seeds=[0]", "eval.steps=2", "eval.best_of=1"]


def tiny_config(method: str = "srpo", *overrides: str, run_dir: str | Path | None = None, cheap: bool = True):
    """A validated Config of ``method`` on the tiny world, cheap unless ``cheap=False``; later overrides win."""
    base = [f"method={method}"] + (COMMON + CHEAP[method] if cheap else [])
    if method != "srpo" and method != "direct-align" and cheap:
        base.append("reward.form=absolute")
    if run_dir is not None:
        base.append(f"run.output_dir={run_dir}")
    return build_config({}, base + list(overrides))


def quiet(*_a, **_k):
    pass


def build_parts(cfg, finetune: bool = True, perturb_lora: bool = True):
    """(adapter, reward, method, trainable params) of ``cfg`` on the CPU, as training builds them. With
    ``perturb_lora`` lora_B gets small random values (:func:`randomise_lora_b`)."""
    device = torch.device("cpu")
    adapter = load_adapter(cfg.model, device, DTYPES[cfg.model.dtype])
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, device, spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)
    params = None
    if finetune:
        torch.manual_seed(0)
        params = apply_finetune_mode(cfg.train, adapter)
        if cfg.train.finetune == "lora" and perturb_lora:
            randomise_lora_b(adapter.transformer)
    return adapter, reward, method, params


def randomise_lora_b(module, seed: int = 1) -> None:
    """Give every ``lora_B`` of ``module`` small random values (0.05 * N(0, 1), from a generator seeded ``seed``).

    peft zero-initialises lora_B, so a fresh LoRA leaves the model's output unchanged and every lora_A gradient is
    0; after this both factors train and the LoRA changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def context(step: int = 0, prompts=PROMPTS, seed: int = 3, rank: int = 0, world_size: int = 1) -> StepContext:
    """The context of one step for ``prompts`` (this rank's), seeded with ``seed``."""
    return StepContext(step=step, prompts=list(prompts), seed=seed, rank=rank, world_size=world_size,
                       batch_size=len(prompts))


def run_step(method, step: int = 0, prompts=PROMPTS, seed: int = 3, backward=None):
    """``method.train_step`` on :func:`context`; ``backward`` defaults to ``loss.backward()``."""
    return method.train_step(context(step, prompts, seed), backward or (lambda loss: loss.backward()))


def record_branches(monkeypatch, method) -> list:
    """Wrap ``method.branch_loss`` (SRPO) to collect each pass's BranchResult, in call order."""
    results = []
    orig = method.branch_loss

    def recorded(*a, **k):
        loss, res = orig(*a, **k)
        results.append(res)
        return loss, res

    monkeypatch.setattr(method, "branch_loss", recorded)
    return results
