"""Worked examples of the baseline methods' losses and sampling math on hand-computed tensors (no model)."""

from __future__ import annotations

import math

import pytest
import torch

from directalign import flow
from directalign.methods import alignprop, grpo
from directalign.methods.common import ode_chain, one_step_x0
from directalign.methods.draft import lv_copies
from directalign.methods.losses import reward_loss
from directalign.methods.refl import refl_loss


def _exact_velocity(x0, eps):
    """The velocity field of a single known pair: v = eps - x0 whatever the state."""
    return lambda x, s: (eps - x0).expand_as(x)


# ----------------------------------------------------------------------------------------------------- ReFL
def test_refl_one_step_prediction_by_hand():
    # x = 0.25 * eps + 0.75 * x0 with x0 = [2, -4], eps = [1, 1]: x = [1.75, -2.75]; v = eps - x0 = [-1, 5]
    x0, eps = torch.tensor([[2.0, -4.0]]), torch.tensor([[1.0, 1.0]])
    x = flow.interpolate(x0, eps, 0.25)
    torch.testing.assert_close(x, torch.tensor([[1.75, -2.75]]))
    v = eps - x0
    torch.testing.assert_close(one_step_x0(x, v, 0.25), x0)  # 1.75 - 0.25 * (-1) = 2, -2.75 - 0.25 * 5 = -4
    # a wrong velocity moves the prediction by -sigma * error: v + [2, 0] -> x0 - [0.5, 0]
    torch.testing.assert_close(one_step_x0(x, v + torch.tensor([[2.0, 0.0]]), 0.25), torch.tensor([[1.5, -4.0]]))


def test_refl_hinge_loss_by_hand():
    r = torch.tensor([0.5, 0.9, 0.7, -0.3])
    # relu(0.7 - r) = [0.2, 0, 0, 1.0] -> mean 0.3
    assert float(refl_loss(r, "hinge", 0.7)) == pytest.approx(0.3)
    # ImageReward's relu(2 - r) with grad_scale 1e-3: [1.5, 1.1, 1.3, 2.3] -> mean 1.55 -> 1.55e-3
    assert float(refl_loss(r, "hinge", 2.0, 1e-3)) == pytest.approx(1.55e-3)
    assert float(refl_loss(r, "linear", 0.7)) == pytest.approx(-0.45)
    # the hinge passes no gradient once r >= threshold
    rg = r.clone().requires_grad_(True)
    refl_loss(rg, "hinge", 0.7).backward()
    torch.testing.assert_close(rg.grad, torch.tensor([-0.25, 0.0, 0.0, -0.25]))


# ----------------------------------------------------------------------------------------------------- DRaFT
def test_draft_lv_copies_recover_x0_with_exact_velocity_and_average():
    x0 = torch.tensor([[0.5, -1.0, 2.0]])
    noises = [torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[-2.0, 3.0, 0.5]])]

    def velocity(x, s):
        # the velocity of the copy's own noise: recover which eps made x from x = s eps + (1 - s) x0
        eps = (x - (1 - s[:, None]) * x0) / s[:, None]
        return eps - x0

    copies = lv_copies(x0, 0.2, noises, velocity)
    assert len(copies) == 2
    for c in copies:
        torch.testing.assert_close(c, x0)
    # gradient averaging: loss_i = -r_i / n; with r(x) = sum(x) the mean of n identical copies is sum(x0) = 1.5
    losses = [reward_loss(c.sum(1), "linear").mean() / len(copies) for c in copies]
    assert float(sum(losses)) == pytest.approx(-1.5)


def test_differentiable_chain_gradient_reaches_only_the_last_k_calls():
    # v(x, s) = w * x for a scalar weight w per call: the chain x_{i+1} = x_i + ds_i * w_i * x_i
    sig = flow.sigma_schedule(4, 1.0)  # 1, .75, .5, .25, 0
    weights = [torch.tensor(0.5, requires_grad=True) for _ in range(4)]
    calls = []

    def velocity(x, s):
        i = int(round((1 - float(s[0])) * 4))  # which step this call belongs to, from its sigma
        calls.append(i)
        return weights[i] * x

    x = torch.ones(1, 1)
    k = 2
    x_mid = ode_chain(x, sig[: 4 - k + 1], velocity, grad=False)
    out = ode_chain(x_mid, sig[4 - k :], velocity, grad=True)
    out.sum().backward()
    assert weights[0].grad is None and weights[1].grad is None
    assert weights[2].grad is not None and weights[3].grad is not None
    # by hand: factors (1 - .25 * .5) each step: x = 0.875^4; d out / d w_3 = x_3 * (-0.25) = 0.875^3 * -0.25
    assert float(out.detach()) == pytest.approx(0.875**4)
    assert float(weights[3].grad) == pytest.approx(-0.25 * 0.875**3)
    # checkpointing gives the same value and gradients
    for w in weights:
        w.grad = None
    calls.clear()
    x_mid = ode_chain(x, sig[: 4 - k + 1], velocity, grad=False)
    calls_before = len(calls)
    out2 = ode_chain(x_mid, sig[4 - k :], velocity, grad=True, checkpoint=True)
    out2.sum().backward()
    assert len(calls) == calls_before + 2 + 2  # two forward calls, recomputed once each in backward
    assert float(out2.detach()) == pytest.approx(float(out.detach()))
    assert float(weights[3].grad) == pytest.approx(-0.25 * 0.875**3)


# ------------------------------------------------------------------------------------------------- AlignProp
def test_truncation_distributions():
    p = alignprop.truncation_probabilities("uniform", 10, uniform=(6, 9))
    assert p == pytest.approx([0] * 6 + [0.25] * 4)
    assert alignprop.truncation_probabilities("fixed", 5, fixed=4) == [0, 0, 0, 0, 1.0]
    p = alignprop.truncation_probabilities("gaussian", 25, gaussian=(21.0, 2.5))
    assert sum(p) == pytest.approx(1.0)
    # P(b = 21) = Phi(0.5 / 2.5) - Phi(-0.5 / 2.5) = erf(0.2 / sqrt 2)
    assert p[21] == pytest.approx(math.erf(0.2 / math.sqrt(2)))
    # the upper tail is folded into b = 24: P(X >= 23.5) = 1 - Phi(1)
    assert p[24] == pytest.approx(0.5 * (1 - math.erf(1 / math.sqrt(2))))
    assert alignprop.truncation_probabilities("gaussian", 5, gaussian=(9.0, 0.0)) == [0, 0, 0, 0, 1.0]
    # draws stay in range and follow the distribution
    g = torch.Generator().manual_seed(0)
    draws = [alignprop.draw_truncation("gaussian", 25, g, gaussian=(21.0, 2.5)) for _ in range(4000)]
    assert min(draws) >= 0 and max(draws) <= 24
    assert sum(d == 21 for d in draws) / 4000 == pytest.approx(p[21], abs=0.03)
    draws = {alignprop.draw_truncation("uniform", 10, g, uniform=(6, 9)) for _ in range(200)}
    assert draws == {6, 7, 8, 9}


# ------------------------------------------------------------------------------------------------------ GRPO
def test_sde_step_mean_and_std_by_hand():
    # x = 1, v = 0.5, s = 0.5 -> s' = 0.25, ds = -0.25; score = -(x + (1 - s) v) / s = -(1 + 0.25) / 0.5 = -2.5
    x, v = torch.tensor([[1.0]]), torch.tensor([[0.5]])
    # dance, eta = 0.4: g^2 = 0.16; mean = 1 - 0.25 * (0.5 + 0.08 * 2.5) = 1 - 0.25 * 0.7 = 0.825; std = 0.4 * 0.5
    mean, std = grpo.sde_step(x, v, 0.5, 0.25, 0.4, "dance")
    assert float(mean) == pytest.approx(0.825)
    assert float(std) == pytest.approx(0.2)
    # flow, eta = 0.4: g = 0.4 * sqrt(0.5 / 0.5) = 0.4 -> same numbers at s = 0.5
    mean_f, std_f = grpo.sde_step(x, v, 0.5, 0.25, 0.4, "flow")
    assert float(mean_f) == pytest.approx(0.825) and float(std_f) == pytest.approx(0.2)
    # flow at s = 0.8: g^2 = 0.16 * 4 = 0.64; ds = -0.2; score = -(1 + 0.1) / 0.8 = -1.375
    # mean = 1 - 0.2 * (0.5 + 0.32 * 1.375) = 1 - 0.2 * 0.94 = 0.812; std = 0.8 * sqrt(0.2)
    mean_f, std_f = grpo.sde_step(x, v, 0.8, 0.6, 0.4, "flow")
    assert float(mean_f) == pytest.approx(0.812)
    assert float(std_f) == pytest.approx(0.8 * math.sqrt(0.2))
    # Flow-GRPO's own expression of the mean (sd3_sde_with_logprob.py) gives the same number
    s, dt, sd = 0.8, -0.2, 0.8
    flow_grpo_mean = 1.0 * (1 + sd**2 / (2 * s) * dt) + 0.5 * (1 + sd**2 * (1 - s) / (2 * s)) * dt
    assert float(mean_f) == pytest.approx(flow_grpo_mean)
    # at s = 1 Flow-GRPO replaces the 1 / (1 - s) pole by sigma_max
    g1 = grpo.diffusion_coefficient(1.0, 0.7, "flow", sigma_max=0.9)
    assert float(g1) == pytest.approx(0.7 * math.sqrt(1 / 0.1))
    # with no noise the mean is the Euler ODE step
    mean0, std0 = grpo.sde_step(x, v, 0.5, 0.25, 1e-12, "dance")
    torch.testing.assert_close(mean0, flow.euler_step(x, v, 0.5, 0.25))


def test_dance_grpo_flux_step_form_matches():
    # DanceGRPO flux_step: prev = x + ds * v; x0_hat = x - s v; score = -(x - x0_hat (1 - s)) / s^2;
    # prev += -0.5 eta^2 score ds; std = eta sqrt(-ds)
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    s, sn, eta = 0.7, 0.55, 0.3
    ds = sn - s
    x0_hat = x - s * v
    score = -(x - x0_hat * (1 - s)) / s**2
    ref_mean = x + ds * v + (-0.5 * eta**2 * score) * ds
    mean, std = grpo.sde_step(x, v, s, sn, eta, "dance")
    torch.testing.assert_close(mean, ref_mean)
    assert float(std) == pytest.approx(eta * math.sqrt(s - sn))


def test_gaussian_log_prob_matches_closed_form():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(2, 3, 4, generator=g)
    sample = mean + 0.3 * torch.randn(2, 3, 4, generator=g)
    std = torch.tensor([0.3, 0.1]).reshape(2, 1, 1)
    ours = grpo.gaussian_log_prob(sample, mean, std)
    ref = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(sample).mean(dim=(1, 2))
    torch.testing.assert_close(ours, ref)
    # one element by hand: x = mean + std -> -1/2 - log std - log sqrt(2 pi)
    one = grpo.gaussian_log_prob(torch.tensor([[1.5]]), torch.tensor([[1.0]]), torch.tensor(0.5))
    assert float(one) == pytest.approx(-0.5 - math.log(0.5) - 0.5 * math.log(2 * math.pi))
    # it is computed in fp32 whatever the inputs' dtype
    assert grpo.gaussian_log_prob(sample.bfloat16(), mean.bfloat16(), std).dtype == torch.float32


def test_gaussian_kl_matches_torch():
    g = torch.Generator().manual_seed(2)
    m1, m2 = torch.randn(2, 6, generator=g), torch.randn(2, 6, generator=g)
    std = torch.tensor([0.2, 0.5]).reshape(2, 1)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(m1, std.expand_as(m1)),
                                            torch.distributions.Normal(m2, std.expand_as(m2))).mean(1)
    torch.testing.assert_close(grpo.gaussian_kl(m1, m2, std), ref)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
    adv = grpo.group_advantages(r, 3, eps=0.0 + 1e-12)
    # group 1: mean 2, unbiased std 1 -> [-1, 0, 1]; group 2 constant -> exactly 0
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    const = grpo.group_advantages(torch.full((4,), 0.37), 4)
    assert torch.equal(const, torch.zeros(4))
    # eps in the denominator: [0, 2] has mean 1, std sqrt(2) -> +-1 / (sqrt 2 + 0.1)
    adv = grpo.group_advantages(torch.tensor([0.0, 2.0]), 2, eps=0.1)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]) / (math.sqrt(2) + 0.1))


def test_clipped_objective_by_hand():
    ratios = torch.tensor([0.5, 1.0, 1.5, 1.5, 0.5])
    adv = torch.tensor([1.0, -1.0, 2.0, -2.0, -1.0])
    old = torch.zeros(5)
    new = torch.log(ratios).requires_grad_(True)
    loss, r = grpo.clipped_policy_loss(new, old, adv, 0.2)
    torch.testing.assert_close(r.detach(), ratios)
    # per sample max(-A r, -A clip(r, 0.8, 1.2)):
    #   A=1,  r=0.5: max(-0.5, -0.8) = -0.5   (unclipped: a worse ratio is never clipped away)
    #   A=-1, r=1.0: max(1.0, 1.0)   = 1.0
    #   A=2,  r=1.5: max(-3.0, -2.4) = -2.4   (clipped: no credit beyond 1 + eps)
    #   A=-2, r=1.5: max(3.0, 2.4)   = 3.0
    #   A=-1, r=0.5: max(0.5, 0.8)   = 0.8    (clipped)
    assert float(loss.detach()) == pytest.approx((-0.5 + 1.0 - 2.4 + 3.0 + 0.8) / 5)
    loss.backward()
    # d/d log r of -A r is -A r on unclipped entries, 0 on clipped ones; / 5 for the mean
    torch.testing.assert_close(new.grad, torch.tensor([-0.5, 1.0, 0.0, 3.0, 0.0]) / 5)


def test_constant_reward_group_gives_zero_policy_gradient():
    adv = grpo.group_advantages(torch.full((3,), 2.5), 3)
    lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    loss, _ = grpo.clipped_policy_loss(lp, lp.detach(), adv, 1e-4)
    loss.backward()
    assert float(loss.detach()) == 0.0 and torch.equal(lp.grad, torch.zeros(3))


@pytest.mark.parametrize("kind,eta", [("dance", 0.7), ("flow", 0.7)])
def test_sde_keeps_the_flow_marginals(kind, eta):
    # data x0 ~ N(0, c^2): the exact velocity is E[eps - x0 | x_s = x] = (s - (1 - s) c^2) / V(s) * x with
    # V(s) = s^2 + (1 - s)^2 c^2, so the SDE started at N(0, 1) must have variance V(s) at every s.
    c2 = 0.25
    sig = flow.sigma_schedule(400, 1.0)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40000, 1, generator=g)
    stop = 300  # s = 0.25: away from the 1/s score near 0
    for i in range(stop):
        s = float(sig[i])
        var = s**2 + (1 - s) ** 2 * c2
        v = (s - (1 - s) * c2) / var * x
        mean, std = grpo.sde_step(x, v, s, float(sig[i + 1]), eta, kind, float(sig[1]))
        x = mean + std * torch.randn(x.shape, generator=g)
    s = float(sig[stop])
    assert float(x.var()) == pytest.approx(s**2 + (1 - s) ** 2 * c2, rel=0.05)


# ------------------------------------------------------------------------------------------ StepOutput by hand
def test_step_output_sums_losses_and_averages_per_pass_metrics():
    """A step's passes reach the engine as one StepOutput: losses summed (each is already its share), rewards
    averaged over passes, and per pass name the mean reward, sigma, k (``with_k``) and extras."""
    from directalign.methods.base import BranchResult, step_output

    results = [BranchResult("denoise", 0.5, 0.25, 0.8, 0.7, k=0.1),
               BranchResult("inversion", 0.25, -0.5, 0.6, 0.7, k=0.3),
               BranchResult("denoise", 1.0, 0.75, 0.4, 0.3, k=0.2)]
    out = step_output(results, with_k=True)
    assert out.loss == pytest.approx(1.75)
    assert out.reward == pytest.approx((0.25 - 0.5 + 0.75) / 3)
    assert out.metrics == pytest.approx({"denoise_reward": 0.5, "denoise_sigma": 0.6, "denoise_k": 0.15,
                                         "inversion_reward": -0.5, "inversion_sigma": 0.6, "inversion_k": 0.3})
    # without k, and with a pass's extra diagnostics averaged under <name>_<key>
    out = step_output([BranchResult("grpo", 0.0, 1.0, 0.5, extra={"kl": 0.2, "clip_fraction": 0.0}),
                       BranchResult("grpo", 0.5, 2.0, 0.7, extra={"kl": 0.4, "clip_fraction": 1.0})])
    assert out.loss == pytest.approx(0.5) and out.reward == pytest.approx(1.5)
    assert out.metrics == pytest.approx({"grpo_reward": 1.5, "grpo_sigma": 0.6, "grpo_kl": 0.3,
                                         "grpo_clip_fraction": 0.5})
