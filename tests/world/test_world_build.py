"""The world build's single command on a few steps per stage, run twice: every stage runs (the reward in its own
process), the outputs load with plain diffusers / transformers, the log records each stage, and the second run
writes the same weight files as the first."""

from __future__ import annotations

import json

import pytest
import torch

from directalign.world import build

FEW_STEPS = ["--vae-steps", "3", "--generator-steps", "3", "--distill-steps", "3", "--reward-steps", "3",
             "--n-data", "64", "--eval-every", "0", "--threads", "2"]


def _weight_files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.safetensors") if "_work" not in p.parts)


@pytest.mark.slow
def test_single_command_builds_every_stage_and_repeats_itself_byte_for_byte(tmp_path):
    from diffusers import FluxPipeline
    from transformers import CLIPModel

    first, second = tmp_path / "first", tmp_path / "second"
    for out in (first, second):
        build.LOG.clear()
        build.main(["--out", str(out), *FEW_STEPS])

    log = json.loads((first / "build_log.json").read_text())
    assert {"vae", "generator", "distill", "reward"} <= set(log)
    assert log["generator"]["steps"] == 3 and log["reward"]["steps"] == 3 and log["total_seconds"] > 0
    pipe = FluxPipeline.from_pretrained(first / "generator")
    assert pipe.transformer.config.guidance_embeds
    shards = list((first / "generator" / "transformer").glob("*.safetensors"))
    assert shards and all(f.stat().st_size < 8 * 2**20 for f in shards)
    for config in (first / "generator").glob("*/config.json"):  # no trace of the build's scratch directory
        assert "_name_or_path" not in json.loads(config.read_text()), config
    reward = CLIPModel.from_pretrained(first / "reward")
    assert torch.isfinite(reward.logit_scale)

    # each stage runs at a fixed thread count, so the same command writes the same bytes
    files = _weight_files(first)
    assert files == _weight_files(second)
    assert len(files) >= 5  # vae, transformer, two text encoders, reward
    for rel in files:
        assert (first / rel).read_bytes() == (second / rel).read_bytes(), rel
