"""The shipped SD3.5 and Qwen-Image configs load, validate and carry the settings they document."""

from __future__ import annotations

import pytest

from directalign import flow
from directalign.config import load_config, packaged_config


def _config(name: str):
    return load_config(packaged_config(name))


def test_sd35_pickscore_config():
    cfg = _config("sd35-srpo-pickscore")
    assert (cfg.method, cfg.model.family, cfg.reward.kind, cfg.reward.divisor) == ("srpo", "sd3", "pickscore", 20.0)
    assert cfg.model.height % 16 == 0 and cfg.model.width % 16 == 0
    assert cfg.srpo.rollout_guidance > 1 and cfg.srpo.train_guidance == 1.0
    assert cfg.sampling.shift == 3.0  # SD3.5's shift-3 flow schedule
    assert cfg.train.gradient_checkpointing and cfg.train.finetune == "lora"


def test_qwen_image_pickscore_config_has_the_official_qwen_settings():
    cfg = _config("qwen-image-srpo-pickscore")
    s, t = cfg.srpo, cfg.train
    assert (cfg.method, cfg.model.family, cfg.reward.kind, cfg.reward.form) == ("srpo", "qwen-image", "pickscore",
                                                                                "relative")
    assert (s.window, cfg.sampling.shift, s.groundtruth_ratio, s.grid_points, s.window_margin) == \
        ([5, 40], 1.0, 0.6, 100, 2)
    assert (t.learning_rate, t.grad_clip) == (3e-6, 50.0)
    assert (s.inversion_branch, s.discount_mode, s.loss) == (False, "multiplicative", "linear")
    assert (s.rollout_guidance, s.train_guidance, s.rollout_steps) == (4.0, 1.0, 26)
    assert cfg.reward.negative_words == ["Concept art", "Painting", "Anime"]
    grid = flow.training_sigma_grid(s.schedule_steps, cfg.sampling.shift, *s.window, s.grid_points)
    assert float(grid[0]) == pytest.approx(0.90) and float(grid[-1]) == pytest.approx(0.20)
    assert flow.model_share_steps(s.grid_points, s.groundtruth_ratio) == 41  # K = 41 (srpo-method-notes)
