"""benchmarks/step_profile.py's memory per phase on the random-weight tiny world: the numbers are produced and
consistent, and an SRPO step keeps no tensor alive after ``train_step`` beyond the gradients it leaves for the
optimizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "step_profile.py"
NAMED = ["prompts", "rollout", "denoise_forward", "denoise_backward", "inversion_forward", "inversion_backward",
         "optimizer"]


@pytest.fixture(scope="module")
def step_profile():
    spec = importlib.util.spec_from_file_location("step_profile_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_phase_peaks_are_consistent_and_nothing_is_kept(random_world, step_profile, finetune):
    r = step_profile.memory_profile("tiny", tiny_config("srpo", f"train.finetune={finetune}"), steps=2)
    ph, grads = r["phases"], r["trainable_bytes"]
    assert set(NAMED) <= set(ph) and "total" in ph
    for name in NAMED:
        assert ph[name]["peak"] >= ph[name]["end"] >= 0, name
        assert ph[name]["rss_peak_mb"] > 0, name
    # The total is the max over the phases and equals the tracker's own (LiveBytes) peak of the step.
    assert ph["total"]["peak"] == max(v["peak"] for k, v in ph.items() if k != "total") == r["live_peak_bytes"]
    # Each branch's graph is freed by its backward; the gradients (and the step's x0, noise, embeddings) remain.
    for branch in ("denoise", "inversion"):
        assert ph[f"{branch}_forward"]["end"] > ph[f"{branch}_backward"]["end"] >= grads
    assert ph["inversion_forward"]["peak"] >= ph["denoise_forward"]["peak"]  # the first branch's gradients
    # After the optimizer step nothing the step made is alive (the loop frees the gradients with their step);
    # AdamW's two moments persist across steps.
    assert ph["optimizer"]["end"] == ph["total"]["end"] == 0
    assert r["persistent_bytes"] >= 2 * grads
    # Nothing the step made is alive after train_step but the gradients (warm step: caches are filled).
    assert r["kept_after_step_bytes"] == 0
    assert all(s["kept_after_step_bytes"] >= 0 for s in r["steps"])


def test_a_tensor_kept_across_steps_is_detected(random_world, step_profile, monkeypatch):
    """The regression check above can fail: a method that holds on to each branch's loss (and so its graph's
    output) is caught by ``kept_after_step_bytes``."""
    from directalign.methods import srpo

    kept = []
    original = srpo.SRPO.branch_loss

    def holding(self, *args, **kwargs):
        loss, res = original(self, *args, **kwargs)
        kept.append(torch.zeros(1000) + loss.detach())  # 4000 bytes held by the method
        return loss, res

    monkeypatch.setattr(srpo.SRPO, "branch_loss", holding)
    r = step_profile.memory_profile("tiny", tiny_config("srpo"), steps=2)
    assert r["kept_after_step_bytes"] == 2 * 4000  # two branches of the last step
