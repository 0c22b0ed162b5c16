"""ReNO and DNO (directalign.steer.reno / dno): the norm prior and the probability regulariser against closed forms,
zero iterations against plain sampling, gradients reaching the noise and nothing else, the best iterate, costs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PROMPTS
from steer_helpers import SEEDS, Brightness

from directalign.eval.heldout import generate_slots
from directalign.steer import SteerError, SteerSettings
from directalign.steer.dno import DNOOptions, probability_regulariser
from directalign.steer.fk import FKOptions
from directalign.steer.registry import STEERERS
from directalign.steer.reno import ReNOOptions, norm_prior


def slots():
    return [p for p in PROMPTS for _ in SEEDS], [s for _ in PROMPTS for s in SEEDS]


def test_norm_prior_closed_form_and_minimum():
    d = 64
    z = torch.full((1, d), 0.5)  # |z| = 0.5 * sqrt(64) = 4
    assert norm_prior(z).item() == pytest.approx(0.5 * 16 - (d - 1) * math.log(4.0), rel=1e-6)
    r = torch.tensor(math.sqrt(d - 1), requires_grad=True)  # minimal at |z| = sqrt(d - 1)
    (norm_prior(r * torch.ones(1, d) / math.sqrt(d))).sum().backward()
    assert abs(r.grad.item()) < 1e-4
    assert norm_prior(torch.ones(1, d) * 2).item() > norm_prior(torch.ones(1, d)).item() > \
        norm_prior(torch.ones(1, d) * math.sqrt((d - 1) / d)).item()


def test_probability_regulariser_closed_form_and_gaussian_floor():
    block, n = 4, 256
    ones = torch.ones(n * block)
    # every split of a constant vector: mean (1, 1, 1, 1) -> n |m|^2 / (2 block) = n / 2; C = all-ones, |C - I|_2 = 3
    excess = math.sqrt(1 + 3) - 1 - math.sqrt(block / n)
    per_split = n / 2 + n * excess**2 / 2
    assert probability_regulariser(ones, block, 3).item() == pytest.approx(2 * per_split, rel=1e-5)
    assert probability_regulariser(ones, block, 0).item() == pytest.approx(per_split, rel=1e-5)
    g = torch.Generator().manual_seed(0)
    gauss = torch.randn(n * block, generator=g)
    floor = 4 * math.log(2)
    reg = probability_regulariser(gauss, block, 20, torch.Generator().manual_seed(1)).item()
    assert floor - 1e-6 <= reg < floor + 3  # a standard normal sits at (or near) the floor
    assert probability_regulariser(gauss + 0.5, block, 20, torch.Generator().manual_seed(1)).item() > reg + 50
    assert probability_regulariser(gauss * 1.5, block, 20, torch.Generator().manual_seed(1)).item() > reg + 20


def test_reno_with_zero_iterations_is_plain_sampling(world4):
    adapter, cfg = world4
    prompts, seeds = slots()
    res = STEERERS["reno"].run(adapter, Brightness(), prompts, seeds,
                               SteerSettings.from_config(cfg, ReNOOptions(iterations=0)))
    assert torch.allclose(res.images, generate_slots(adapter, prompts, seeds, cfg), atol=1e-5)
    assert res.nfe_grad == 0 and res.nfe_no_grad == cfg.eval.steps * len(prompts)


def test_reno_gradient_reaches_the_noise_only_and_the_best_iterate_is_returned(world4):
    adapter, cfg = world4
    prompts, seeds = slots()
    params = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters()}
    params.update({f"vae.{n}": p.detach().clone() for n, p in adapter.vae.named_parameters()})
    flags = [p.requires_grad for p in adapter.transformer.parameters()]
    score, ticks, it = Brightness(), [], 3
    s = SteerSettings.from_config(cfg, ReNOOptions(iterations=it, lr=20.0, grad_clip=0.0, reg=0.0),
                                  on_step=ticks.append)
    res = STEERERS["reno"].run(adapter, score, prompts, seeds, s)
    history = torch.stack(score.history)  # (iterations + 1, slots)
    assert history.shape == (it + 1, len(prompts))
    best = history.argmax(dim=0)
    assert torch.equal(res.rewards, history.max(dim=0).values)
    assert [c["iteration"] for c in res.chosen] == best.tolist()
    assert [c["start_reward"] for c in res.chosen] == history[0].tolist()
    assert bool((res.rewards > history[0]).all())  # brightness rises under gradient ascent on the noise
    assert not torch.equal(res.noises, torch.cat([adapter.noise(1, s.height, s.width,
                                                                torch.Generator().manual_seed(x)) for x in seeds]))
    assert torch.allclose(res.rewards, res.images.mean(dim=(1, 2, 3)), atol=1e-6)
    for n, p in adapter.transformer.named_parameters():
        assert p.grad is None and torch.equal(p, params[n]), n
    for n, p in adapter.vae.named_parameters():
        assert p.grad is None and torch.equal(p, params[f"vae.{n}"]), n
    assert [p.requires_grad for p in adapter.transformer.parameters()] == flags
    n = len(prompts)
    assert res.nfe_grad == cfg.eval.steps * it * n and res.nfe_no_grad == cfg.eval.steps * n
    assert sum(ticks) == STEERERS["reno"].nfe(n, s) == res.nfe_grad + res.nfe_no_grad
    assert res.reward_calls == (it + 1) * n == score.calls


def test_reno_grad_clip_bounds_each_slots_step(world4):
    adapter, cfg = world4
    prompts, seeds = slots()
    clip = 0.01
    s = SteerSettings.from_config(cfg, ReNOOptions(iterations=1, lr=1.0, grad_clip=clip, reg=0.0))
    res = STEERERS["reno"].run(adapter, lambda im, p: im.mean(dim=(1, 2, 3)) * 1e6, prompts, seeds, s)
    start = torch.cat([adapter.noise(1, s.height, s.width, torch.Generator().manual_seed(x)) for x in seeds]).float()
    assert [c["iteration"] for c in res.chosen] == [1] * len(prompts)  # the step raised every slot's reward
    # the first SGD step with Nesterov momentum 0.9 moves by lr * (1 + 0.9) * gradient; every slot's gradient
    # (huge: the reward is scaled by 1e6) is clipped to norm 0.01 on its own, so every slot moves by exactly 0.019
    moved = (res.noises - start).flatten(1).norm(dim=1)
    assert torch.allclose(moved, torch.full_like(moved, 1.9 * clip), rtol=1e-4)


def test_dno_with_zero_iterations_is_plain_sampling(world4):
    adapter, cfg = world4
    prompts, seeds = slots()
    ode = STEERERS["dno"].run(adapter, Brightness(), prompts, seeds,
                              SteerSettings.from_config(cfg, DNOOptions(iterations=0, eta=0.0)))
    assert torch.allclose(ode.images, generate_slots(adapter, prompts, seeds, cfg), atol=1e-5)
    sde = STEERERS["dno"].run(adapter, Brightness(), prompts, seeds,
                              SteerSettings.from_config(cfg, DNOOptions(iterations=0, eta=0.7)))
    fk1 = STEERERS["fk"].run(adapter, Brightness(), prompts, seeds,
                             SteerSettings.from_config(cfg, FKOptions(n=1, lam=0.0, eta=0.7)))
    assert torch.allclose(sde.images, fk1.images, atol=1e-5)  # the same SDE sample of each seed
    assert (sde.images - ode.images).abs().max() > 1e-3


def test_dno_optimises_every_noise_and_keeps_the_model_frozen(world4):
    adapter, cfg = world4
    prompts, seeds = slots()
    params = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters()}
    score, it = Brightness(), 2
    seen = []
    orig = torch.optim.AdamW.step

    def spy(self, *a, **k):  # record which tensors the optimizer steps and whether they got gradient
        seen.append([(tuple(p.shape), p.grad is not None and bool(p.grad.abs().sum() > 0))
                     for g in self.param_groups for p in g["params"]])
        return orig(self, *a, **k)

    torch.optim.AdamW.step = spy
    try:
        s = SteerSettings.from_config(cfg, DNOOptions(iterations=it, lr=0.5, eta=0.7, gamma=0.1, permutations=2))
        res = STEERERS["dno"].run(adapter, score, prompts, seeds, s)
    finally:
        torch.optim.AdamW.step = orig
    steps = cfg.eval.steps
    assert len(seen) == it and all(len(group) == 2 for group in seen)  # initial noise and injected noises
    (init_shape, init_grad), (inj_shape, inj_grad) = seen[0]
    assert init_grad and inj_grad and inj_shape[:2] == (len(prompts), steps - 1) and init_shape[0] == len(prompts)
    assert bool((res.rewards >= torch.stack(score.history)[0]).all())
    for n, p in adapter.transformer.named_parameters():
        assert p.grad is None and torch.equal(p, params[n]), n
    n = len(prompts)
    assert res.nfe_grad == steps * it * n == res.extra["nfe_recomputed"] and res.nfe_no_grad == steps * n
    assert res.reward_calls == (it + 1) * n == score.calls


def test_a_reward_without_gradient_is_a_one_line_error(world4):
    adapter, cfg = world4
    prompts, seeds = slots()

    def detached(images, prompts):
        return images.detach().mean(dim=(1, 2, 3))

    for name, opts in (("reno", ReNOOptions(iterations=1)), ("dno", DNOOptions(iterations=1, permutations=1))):
        with pytest.raises(SteerError, match="not differentiable") as e:
            STEERERS[name].run(adapter, detached, prompts[:1], seeds[:1], SteerSettings.from_config(cfg, opts))
        assert "\n" not in str(e.value)
