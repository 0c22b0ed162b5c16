"""Every steerer on tiny random-weight SD3 and Qwen-Image pipelines (the real diffusers classes; the FLUX family is
the tiny world of the other steering tests): one image per slot, the costs in closed form, never below the start."""

from __future__ import annotations

import pytest
import torch
from steer_helpers import Brightness

from directalign.adapters.qwen_image import QwenImageAdapter
from directalign.adapters.sd3 import SD3Adapter
from directalign.adapters.tiny import tiny_qwen_image_pipeline, tiny_sd3_pipeline
from directalign.steer import SteerSettings
from directalign.steer.run import build_options
from directalign.steer.registry import STEERERS

FAMILIES = {"sd3": (tiny_sd3_pipeline, SD3Adapter, 32, 16), "qwen-image": (tiny_qwen_image_pipeline,
                                                                         QwenImageAdapter, 16, 64)}
OPTIONS = {"best-of-n": {"n": 2}, "noise-search": {"n": 1, "rounds": 1, "neighbors": 2},
           "fk": {"n": 2, "lam": 50.0, "resample_start": 0.3, "resample_end": 0.4},
           "reno": {"iterations": 1, "lr": 2.0}, "dno": {"iterations": 1, "lr": 0.1, "permutations": 2}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    build, cls, side, seq = FAMILIES[request.param]
    return cls(build(0), max_sequence_length=seq), side


@pytest.mark.parametrize("name", list(STEERERS))
def test_every_steerer_runs_on_the_family(family, name):
    adapter, side = family
    prompts, seeds = ["a red circle", "a green square"], [0, 1]
    s = SteerSettings(3, 1.0, None, side, side, batch_size=4, options=build_options(name, OPTIONS[name]))
    score = Brightness()
    before = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters()}
    res = STEERERS[name].run(adapter, score, prompts, seeds, s)
    assert res.images.shape == (2, 3, side, side) and res.rewards.shape == (2,)
    assert torch.allclose(res.rewards, res.images.mean(dim=(1, 2, 3)), atol=1e-5)
    assert res.nfe_grad + res.nfe_no_grad == STEERERS[name].nfe(2, s)
    assert res.reward_calls == score.calls
    if name in ("noise-search", "reno", "dno"):  # keeps the best iterate: never below where it started
        assert bool((res.rewards >= torch.stack(score.history)[0] - 1e-6).all())
    for n, p in adapter.transformer.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("family", list(FAMILIES))
def test_python_entry_point_steers_a_saved_pipeline_of_the_family(family, tmp_path):
    """``directalign.steered_sample`` on a saved tiny pipeline directory (the way a user points at a model): the
    family is read from ``model_index.json``, and the tiny world's reward scores its images."""
    import directalign as da

    build, _, side, _ = FAMILIES[family]
    build(0).save_pretrained(tmp_path / family)
    settings = {"eval.steps": 2, "model.height": side, "model.width": side, "model.max_sequence_length": 16}
    runs = [da.steered_sample(str(tmp_path / family), ["a red circle"], method="fk", seeds=[0, 1],
                              reward="tiny-world", options={"n": 2, "lambda": 5.0}, settings=settings)
            for _ in range(2)]
    assert runs[0].images.shape == (2, 3, side, side)
    assert torch.equal(runs[0].images, runs[1].images) and runs[0].extra["reward_spec"] == "tiny-world"
    assert runs[0].nfe_no_grad == 2 * 2 * 2
