"""Held-out samples during training (``run.sample_every``): the grids and points they write, and that taking them
does not change the training trajectory (LoRA dropout on, so the eval-mode switch and the RNG both matter)."""

from __future__ import annotations

import json

import torch
from helpers import quiet, tiny_config
from PIL import Image
from safetensors.torch import load_file

from directalign.logging_utils import read_heldout, read_metrics
from directalign.periodic_samples import MAX_PROMPTS, pick_prompts


def _train(run_dir, *overrides):
    from directalign.training import train

    cfg = tiny_config("srpo", "train.steps=2", "train.lora_dropout=0.2", *overrides, run_dir=run_dir)
    return cfg, train(cfg, log=quiet)


def test_samples_every_n_steps_leave_the_trajectory_unchanged(random_world, tmp_path):
    cfg, _ = _train(tmp_path / "with", "run.sample_every=2")
    _train(tmp_path / "without")
    a, b = tmp_path / "with", tmp_path / "without"

    records = read_heldout(a)
    assert [r["step"] for r in records] == [0, 2]  # the base model's point and every 2nd step (not step 1)
    n_prompts = min(MAX_PROMPTS, 24)
    for r in records:
        assert r["image"] == f"samples/step-{r['step']}.png" and isinstance(r["reward"], float)
        assert len(r["prompts"]) == n_prompts and r["seeds"] == cfg.eval.seeds[:2]
        grid = Image.open(a / r["image"])
        n = n_prompts * len(r["seeds"])  # one row, upscaled 3x with 2 px padding (report_images.save_grid)
        assert grid.size == ((n * (32 + 2) + 2) * 3, (32 + 2 + 2) * 3)
    assert records[0]["prompts"] == records[1]["prompts"]
    assert not (b / "samples" / "step-0.png").exists() and read_heldout(b) == []

    # the same losses, rewards and exported LoRA, bit for bit
    key = ("step", "loss", "reward", "grad_norm")
    assert [[r[k] for k in key] for r in read_metrics(a)] == [[r[k] for k in key] for r in read_metrics(b)]
    la = load_file(str(a / "export" / "lora" / "pytorch_lora_weights.safetensors"))
    lb = load_file(str(b / "export" / "lora" / "pytorch_lora_weights.safetensors"))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    assert json.loads((a / "summary.json").read_text())["reward_after"] == \
        json.loads((b / "summary.json").read_text())["reward_after"]


def test_pick_prompts_spreads_over_the_list():
    prompts = [f"p{i}" for i in range(24)]
    assert pick_prompts(prompts) == ["p0", "p8", "p15", "p23"]
    assert pick_prompts(prompts[:3]) == ["p0", "p1", "p2"]
    assert pick_prompts(prompts, 1) == ["p0"]


def test_samples_use_eval_mode_and_restore_the_training_modes(random_world, tmp_path):
    """LoRA dropout is off while sampling (two grids of the same weights are identical) and every module's
    train/eval mode is put back afterwards."""
    from helpers import build_parts

    from directalign.periodic_samples import HeldoutSamples

    cfg = tiny_config("srpo", "train.lora_dropout=0.5", "run.sample_every=1")
    adapter, reward, _, _ = build_parts(cfg)
    transformer = adapter.transformer
    transformer.train()
    next(m for m in transformer.modules() if m is not transformer).eval()  # a mixed state must survive too
    modes = [m.training for m in transformer.modules()]
    prompts = ["a red circle on a blue background", "a green square on a yellow background"]
    grids = []
    for name in ("a", "b"):
        torch.manual_seed(len(grids))  # a different global RNG state each time: dropout would show
        HeldoutSamples(cfg, adapter, reward, prompts, tmp_path / name)(3)
        grids.append(Image.open(tmp_path / name / "samples" / "step-3.png").tobytes())
    assert grids[0] == grids[1]
    assert [m.training for m in transformer.modules()] == modes
    HeldoutSamples(cfg, adapter, reward, prompts, tmp_path / "c")(0)  # no logger: nothing but the grid
    assert (tmp_path / "c" / "samples" / "step-0.png").is_file()
