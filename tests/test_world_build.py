"""The world build's single command on a few steps per stage: every stage runs (the reward in its own process), the
outputs load with plain diffusers / transformers, and the log records each stage."""

from __future__ import annotations

import json

import pytest
import torch

from directalign.world import build


@pytest.mark.slow
def test_single_command_builds_every_stage_with_the_reward_in_parallel(tmp_path):
    from diffusers import FluxPipeline
    from transformers import CLIPModel

    build.LOG.clear()
    build.main(["--out", str(tmp_path), "--vae-steps", "2", "--generator-steps", "2", "--distill-steps", "2",
                "--reward-steps", "2", "--n-data", "64", "--eval-every", "0", "--threads", "2"])
    log = json.loads((tmp_path / "build_log.json").read_text())
    assert {"vae", "generator", "distill", "reward"} <= set(log)
    assert log["generator"]["steps"] == 2 and log["reward"]["steps"] == 2 and log["total_seconds"] > 0
    pipe = FluxPipeline.from_pretrained(tmp_path / "generator")
    assert pipe.transformer.config.guidance_embeds
    shards = list((tmp_path / "generator" / "transformer").glob("*.safetensors"))
    assert shards and all(f.stat().st_size < 8 * 2**20 for f in shards)
    reward = CLIPModel.from_pretrained(tmp_path / "reward")
    assert torch.isfinite(reward.logit_scale)
