"""The flow math against closed-form answers (directalign.flow)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from directalign import flow


def _pair(seed=0, shape=(3, 5, 4)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)


def test_shift_fixes_endpoints_and_is_monotone():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0, 7.0):
        y = flow.shift_sigmas(t, s)
        assert y[0] == 0 and y[-1] == 1
        assert torch.all(y[1:] > y[:-1])
    assert torch.equal(flow.shift_sigmas(t, 1.0), t)
    # s > 1 spends more of the schedule at high noise: shifted >= unshifted
    assert torch.all(flow.shift_sigmas(t, 3.0) >= t)
    # closed form at t = 0.5, s = 3: 1.5 / 2 = 0.75
    assert flow.shift_sigmas(torch.tensor(0.5, dtype=torch.float64), 3.0).item() == pytest.approx(0.75)


def test_official_hps_window_values():
    sched = flow.sigma_schedule(50, 3.0)
    assert len(sched) == 51 and sched[0] == 1 and sched[-1] == 0
    assert sched[5].item() == pytest.approx(0.964285714, abs=1e-8)  # 3*0.9/(1+2*0.9)
    assert sched[25].item() == pytest.approx(0.75)
    assert sched[30].item() == pytest.approx(2 / 3)
    grid = flow.training_sigma_grid(50, 3.0, 5, 25, 1000)
    assert grid[0].item() == pytest.approx(0.964285714) and grid[-1].item() == pytest.approx(0.75)
    assert flow.model_share_steps(1000, 0.9) == 100  # int(99.999...) + 1, as the official code computes it


@given(sigma=st.floats(0.0, 0.999), seed=st.integers(0, 1000))
@settings(max_examples=60, deadline=None)
def test_recover_inverts_inject(sigma, seed):
    x0, eps = _pair(seed)
    x = flow.interpolate(x0, eps, sigma)
    assert torch.allclose(flow.recover_x0(x, eps, sigma), x0, atol=1e-6 * max(1.0, 1 / (1 - sigma)))


@given(sq=st.floats(0.01, 0.99), st_=st.floats(0.0, 0.98), seed=st.integers(0, 100))
@settings(max_examples=80, deadline=None)
def test_direct_align_with_exact_velocity_returns_x0_in_both_directions(sq, st_, seed):
    x0, eps = _pair(seed)

    def exact(x, s):
        return eps - x0

    out = flow.direct_align_x0(x0, eps, sq, st_, exact)
    assert torch.allclose(out, x0, atol=1e-8 / (1 - st_) + 1e-9)


def test_direct_align_per_sample_sigmas_and_grad_scale():
    x0, eps = _pair(1, shape=(2, 6))
    bias = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)

    def velocity(x, s):  # exact velocity plus a learnable offset
        return eps - x0 + bias

    sq, st_ = torch.tensor([0.9, 0.5], dtype=torch.float64), torch.tensor([0.8, 0.6], dtype=torch.float64)
    out = flow.direct_align_x0(x0, eps, sq, st_, velocity)
    # x0_hat = x0 + (st - sq) / (1 - st) * bias: denoise (row 0) subtracts, inversion (row 1) adds
    coef = ((st_ - sq) / (1 - st_))[:, None]
    assert torch.allclose(out, x0 + coef * bias.detach())
    out.sum().backward()
    assert bias.grad[0, 0].item() == pytest.approx(((0.8 - 0.9) / 0.2) + ((0.6 - 0.5) / 0.4))


def test_direct_align_does_not_backprop_into_x0_or_noise():
    x0, eps = _pair(2)
    x0.requires_grad_(True)
    eps.requires_grad_(True)
    out = flow.direct_align_x0(x0, eps, 0.9, 0.8, lambda x, s: x * 0)
    assert not out.requires_grad


def test_euler_ode_with_exact_straight_velocity_reaches_x0():
    x0, eps = _pair(3)
    out = flow.euler_ode(eps, flow.sigma_schedule(7, 3.0), lambda x, s: eps - x0)
    assert torch.allclose(out, x0, atol=1e-10)


def test_euler_step_closed_form():
    x = torch.ones(2, 3)
    v = torch.full((2, 3), 2.0)
    assert torch.allclose(flow.euler_step(x, v, 0.75, 0.5), torch.full((2, 3), 0.5))


def test_draw_window_matches_official_indexing():
    grid = flow.training_sigma_grid(50, 3.0, 5, 25, 1000)
    g = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(300):
        d = flow.draw_window(grid, 0.9, g, margin=5)
        assert 5 <= d.m <= 995
        assert d.k_steps == min(1000 - d.m, 100, d.m)
        assert d.denoise_query == grid[1000 - d.m - d.k_steps].item()
        assert d.denoise_target == grid[1000 - d.m].item()
        assert d.denoise_query > d.denoise_target
        assert d.inversion_query < d.inversion_target
        if d.m - d.k_steps >= 1:  # unclamped: both branches recover at the same sigma
            assert d.inversion_target == d.denoise_target
        seen.add(d.m)
    assert len(seen) > 200
    # the model's share is ~K * (0.9643 - 0.75) / 999 = 0.0215 for unclamped draws (srpo-method-notes 1.5)
    d = next(flow.draw_window(grid, 0.9, torch.Generator().manual_seed(s)) for s in range(100)
             if flow.draw_window(grid, 0.9, torch.Generator().manual_seed(s)).k_steps == 100)
    assert d.delta_sigma == pytest.approx(100 * (grid[0] - grid[-1]).item() / 999, rel=1e-9)
    assert d.delta_sigma == pytest.approx(0.02145, abs=1e-4)


@pytest.mark.parametrize("n, margin, ratio", [(12, 2, 0.9), (12, 2, 0.5), (14, 3, 0.0), (4, 1, 0.5)])
def test_draw_window_covers_margin_to_n_minus_margin_inclusive(n, margin, ratio):
    """m ~ U{margin, ..., n - margin}, both ends included, as the official ``random.randint(5, 1000 - 5)``
    (Tencent-Hunyuan/SRPO, fastvideo/SRPO.py); every grid index is valid at both ends."""
    grid = flow.training_sigma_grid(50, 3.0, 5, 25, n)
    big_k = flow.model_share_steps(n, ratio)
    draws = {}
    for seed in range(400):
        d = flow.draw_window(grid, ratio, torch.Generator().manual_seed(seed), margin=margin)
        draws.setdefault(d.m, d)
    assert set(draws) == set(range(margin, n - margin + 1))
    for m in (margin, n - margin):
        d = draws[m]
        assert d.k_steps == min(n - m, big_k, m) >= 1
        assert d.m_inversion == max(m - d.k_steps, 1)
        indices = (n - m - d.k_steps, n - m, n - d.m_inversion, n - d.m_inversion - d.k_steps)
        assert all(0 <= i <= n - 1 for i in indices), (m, indices)
        assert (d.denoise_query, d.denoise_target, d.inversion_query, d.inversion_target) == tuple(
            grid[i].item() for i in indices)
        assert d.denoise_query > d.denoise_target and d.inversion_query < d.inversion_target
    # at the late end the clamp k = n - m = margin makes the denoise query the grid's first (noisiest) point
    assert draws[n - margin].k_steps == min(margin, big_k)
    if big_k >= margin:
        assert draws[n - margin].denoise_query == grid[0].item()


def test_draw_window_rejects_a_zero_margin():
    with pytest.raises(ValueError, match="margin"):
        flow.draw_window(torch.linspace(1, 0, 10), 0.9, torch.Generator().manual_seed(0), margin=0)


def test_ramps_and_discounts():
    assert flow.linear_ramp(0.1, 0.25, 1000, 0) == pytest.approx(0.1)
    assert flow.linear_ramp(0.1, 0.25, 1000, 999) == pytest.approx(0.25)
    assert flow.linear_ramp(0.3, 0.01, 1000, 500) == pytest.approx(0.3 + (0.01 - 0.3) * 500 / 999)
    assert flow.multiplicative_discount(100, 0) == 0
    assert flow.multiplicative_discount(100, 100) == pytest.approx(1.0)
    assert flow.multiplicative_discount(100, 50) == pytest.approx(0.75)


def test_quantize_sigma():
    s = torch.tensor([0.9643, 0.75, 0.12345])
    assert torch.allclose(flow.quantize_sigma(s), torch.tensor([0.964, 0.75, 0.123]))
    assert torch.equal(flow.quantize_sigma(s, 0), s)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        flow.training_sigma_grid(50, 3.0, 25, 5, 100)
    with pytest.raises(ValueError):
        flow.model_share_steps(100, 1.0)
    with pytest.raises(ValueError):
        flow.sigma_schedule(0)
    with pytest.raises(ValueError):
        flow.shift_sigmas(torch.tensor([0.5]), 0.0)
    assert math.isfinite(flow.shift_sigmas(torch.tensor(0.5), 1e-3).item())
