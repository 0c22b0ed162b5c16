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
    for config in (tmp_path / "generator").glob("*/config.json"):  # no trace of the build's scratch directory
        assert "_name_or_path" not in json.loads(config.read_text()), config
    reward = CLIPModel.from_pretrained(tmp_path / "reward")
    assert torch.isfinite(reward.logit_scale)


@pytest.mark.slow
def test_the_same_command_writes_the_same_weights(tmp_path):
    """Every stage runs at a fixed thread count (never one that depends on when the parallel reward process ends), so
    two runs of the command write identical weight files."""
    args = ["--vae-steps", "3", "--generator-steps", "3", "--distill-steps", "3", "--reward-steps", "3",
            "--n-data", "64", "--eval-every", "0", "--threads", "2"]
    for name in ("first", "second"):
        build.LOG.clear()
        build.main(["--out", str(tmp_path / name), *args])
    def shipped_weight_files(root):
        return sorted(p.relative_to(root) for p in root.rglob("*.safetensors") if "_work" not in p.parts)

    first = shipped_weight_files(tmp_path / "first")
    assert first == shipped_weight_files(tmp_path / "second")
    assert len(first) >= 5  # vae, transformer, two text encoders, reward
    for rel in first:
        assert (tmp_path / "first" / rel).read_bytes() == (tmp_path / "second" / rel).read_bytes(), rel
