"""The steering tests' fixture: the random-weight tiny world with 4-step sampling."""

from __future__ import annotations

import pytest
from steer_helpers import SEEDS

from directalign.eval.models import load_model, resolve_model
from directalign.eval.settings import settings_config


@pytest.fixture
def world4(random_world):
    """(adapter, cfg) of the random-weight tiny world with 4-step sampling."""
    ref = resolve_model("tiny-world")
    cfg, _ = settings_config(None, [ref], {"eval.steps": 4, "eval.seeds": SEEDS, "run.progress": False})
    return load_model(ref, cfg), cfg
