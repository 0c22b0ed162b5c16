"""A shipped real-model config (SD3.5) pointed at a saved tiny random SD3 pipeline and the random tiny-world reward,
for tests that check such a config builds its method and trains a step (see tests/adapters/test_adapters_sd3_qwen.py
for the tiny pipelines)."""

from __future__ import annotations

from pathlib import Path

import torch

from directalign.adapters.tiny import tiny_sd3_pipeline
from directalign.config import load_config, packaged_config

SIDE, SEQ = 32, 16  # the tiny SD3's image side and text length (as the adapter tests use it)


def tiny_sd3_config(name: str, tmp_path: Path, overrides=()):
    """``configs/<name>.yaml`` with the model replaced by a tiny SD3 saved under ``tmp_path`` and the reward by the
    tiny world's (the ``random_world`` fixture must be active); every method setting is the shipped one unless
    ``overrides`` change it."""
    path = tmp_path / "tiny-sd3"
    if not path.exists():
        tiny_sd3_pipeline(0).save_pretrained(path)
    return load_config(packaged_config(name), [
        f"model.path={path}", f"model.height={SIDE}", f"model.width={SIDE}", f"model.max_sequence_length={SEQ}",
        "model.dtype=float32", "model.device=cpu", "reward.kind=tiny-world", "reward.path=",
        "train.gradient_checkpointing=false", "train.mixed_precision=no", *overrides])


def build_method(cfg):
    """(method, trainable params) of ``cfg`` on the CPU, built as training builds them (method first)."""
    from directalign.adapters.loading import load_adapter
    from directalign.engine.finetune import apply_finetune_mode
    from directalign.methods.registry import METHODS
    from directalign.rewards.registry import load_reward

    adapter = load_adapter(cfg.model, torch.device("cpu"), torch.float32)
    reward = load_reward(cfg.reward, torch.device("cpu"), METHODS[cfg.method].held_out_form(cfg)[0])
    method = METHODS[cfg.method].build(cfg, adapter, reward)
    return method, apply_finetune_mode(cfg.train, adapter)
