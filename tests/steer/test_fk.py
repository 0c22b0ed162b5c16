"""FK steering (directalign.steer.fk): the potentials, ESS and resampling on worked examples, lambda = 0 against
independent SDE samples, the costs in closed form, determinism."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PROMPTS
from steer_helpers import SEEDS, Brightness

from directalign.steer import SteerSettings
from directalign.steer.best_of_n import candidate_seed
from directalign.steer.fk import (
    FKOptions,
    effective_sample_size,
    potential_log_weights,
    resample_indices,
    resampling_steps,
)
from directalign.steer.registry import STEERERS
from directalign.steer.sde import sde_sample, step_noises


def slots():
    return [p for p in PROMPTS for _ in SEEDS], [s for _ in PROMPTS for s in SEEDS]


def test_resampling_steps_follow_the_reference_grid():
    assert resampling_steps(100, 0.2, 0.8, 0.2) == [20, 40, 60, 80]  # every 20 of 100 within [20, 80]
    assert resampling_steps(5, 0.2, 0.8, 0.2) == [1, 2, 3]  # round(0.8 * 5) = 4 is the last step: never resampled
    assert resampling_steps(10, 0.5, 0.5, 0.1) == [5]


def test_potentials_on_a_worked_example():
    r, lam = torch.tensor([1.0, 3.0, -2.0]), 2.0
    log_w, h = potential_log_weights("max", r, torch.tensor([2.0, float("-inf"), float("-inf")]), lam)
    assert h.tolist() == [2.0, 3.0, -2.0] and log_w.tolist() == [4.0, 6.0, -4.0]
    log_w, h = potential_log_weights("add", r, torch.tensor([1.0, 2.0, 0.0]), lam)
    assert h.tolist() == [2.0, 5.0, -2.0] and log_w.tolist() == [4.0, 10.0, -4.0]
    log_w, h = potential_log_weights("diff", r, torch.tensor([1.0, 2.0, 0.0]), lam)
    assert h.tolist() == r.tolist() and log_w.tolist() == [0.0, 2.0, -4.0]


def test_ess_and_resampling_on_worked_examples():
    assert effective_sample_size(torch.zeros(4)) == pytest.approx(4.0)
    assert effective_sample_size(torch.log(torch.tensor([3.0, 1.0]))) == pytest.approx(1 / (0.75**2 + 0.25**2))
    assert effective_sample_size(torch.tensor([0.0, -1e4, -1e4])) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    assert resample_indices(torch.full((4,), 2.5), "multinomial", 0.5, g) is None  # uniform: nothing to learn
    # ESS of weights (3, 1) is 1.6 >= 0.5 * 2: the ess scheme keeps the population, multinomial draws from it
    log_w = torch.log(torch.tensor([3.0, 1.0]))
    assert resample_indices(log_w, "ess", 0.5, g) is None
    assert resample_indices(log_w, "ess", 0.9, g) is not None
    assert resample_indices(torch.tensor([0.0, -1e4, -1e4, -1e4]), "multinomial", 0.5, g).tolist() == [0, 0, 0, 0]
    draws = torch.cat([resample_indices(log_w, "multinomial", 0.5, g) for _ in range(4000)])
    assert (draws == 0).float().mean().item() == pytest.approx(0.75, abs=0.02)  # proportional to the weights


def sde_images(adapter, cfg, prompt, seed, k, eta):
    """k independent SDE samples of one slot, particle j from best-of-n's candidate j noise."""
    s = SteerSettings.from_config(cfg)
    out = []
    for j in range(k):
        x = adapter.noise(1, s.height, s.width, torch.Generator().manual_seed(candidate_seed(seed, j)))
        with torch.no_grad():
            x0 = sde_sample(adapter, adapter.encode_prompts([prompt]), x, step_noises(adapter, seed, j, s).float(), s,
                            eta)
            out.append(adapter.decode(x0, s.height, s.width).float())
    return torch.cat(out)


def test_lambda_zero_is_the_best_of_independent_sde_samples(world4):
    adapter, cfg = world4
    prompts, seeds = slots()
    k, score = 3, Brightness()
    res = STEERERS["fk"].run(adapter, score, prompts, seeds,
                             SteerSettings.from_config(cfg, FKOptions(n=k, lam=0.0, resample_start=0.0)))
    for i, (p, sd) in enumerate(zip(prompts, seeds)):
        imgs = sde_images(adapter, cfg, p, sd, k, 0.7)
        r = imgs.mean(dim=(1, 2, 3))
        j = int(r.argmax())
        assert res.chosen[i] == {"particle": j, "ancestor": j, "resampled": 0}
        assert torch.allclose(res.images[i], imgs[j], atol=1e-5)
        assert res.rewards[i].item() == pytest.approx(r[j].item(), abs=1e-6)
    # the particles are really stochastic: two particles of one slot differ, and differ from the ODE sample
    imgs = sde_images(adapter, cfg, prompts[0], seeds[0], 2, 0.7)
    assert (imgs[0] - imgs[1]).abs().max() > 1e-3


def test_fk_resamples_counts_its_costs_and_is_deterministic(world4):
    adapter, cfg = world4
    prompts, seeds = slots()
    k = 4
    opts = FKOptions(n=k, lam=200.0, potential="diff", resample_start=0.25, resample_end=0.5, resample_every=0.25)
    runs = []
    for _ in range(2):
        score, ticks = Brightness(), []
        s = SteerSettings.from_config(cfg, opts, on_step=ticks.append)
        runs.append(STEERERS["fk"].run(adapter, score, prompts, seeds, s))
        steps, n = cfg.eval.steps, len(prompts)
        assert runs[-1].extra["resampling_steps"] == [1, 2]
        assert runs[-1].nfe_no_grad == steps * k * n == sum(ticks) == STEERERS["fk"].nfe(n, s)
        assert runs[-1].reward_calls == k * (2 + 1) * n == score.calls and runs[-1].nfe_grad == 0
    a, b = runs
    assert torch.equal(a.images, b.images) and a.chosen == b.chosen
    assert all(c["resampled"] == 2 for c in a.chosen)  # distinct rewards with a large lambda always resample
    assert torch.allclose(a.rewards, a.images.mean(dim=(1, 2, 3)), atol=1e-6)
    # the result of a slot does not depend on the other slots
    alone = STEERERS["fk"].run(adapter, Brightness(), prompts[1:2], seeds[1:2], SteerSettings.from_config(cfg, opts))
    assert torch.allclose(alone.images[0], a.images[1], atol=1e-5) and alone.chosen[0] == a.chosen[1]


def test_fk_option_errors_are_one_line():
    from directalign.steer import SteerError
    from directalign.steer.run import build_options

    for kw, flag in [({"lam": -1.0}, "--steer-lambda"), ({"potential": "min"}, "--steer-potential"),
                     ({"resample_start": 0.9, "resample_end": 0.5}, "--steer-resample-end"),
                     ({"ess_threshold": 0.0}, "--steer-ess-threshold"), ({"eta": -0.1}, "--steer-eta"),
                     ({"n": 0}, "--steer-n")]:
        with pytest.raises(SteerError, match=flag) as e:
            build_options("fk", kw)
        assert "\n" not in str(e.value)
    with pytest.raises(SteerError, match="fk has no option 'rounds'"):
        build_options("fk", {"rounds": 2})
    assert build_options("fk", {"lambda": 3.0}).lam == 3.0 and not math.isnan(build_options("fk").lam)
