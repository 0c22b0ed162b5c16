"""Rectified-flow math for Direct-Align, as pure torch functions (imports nothing else from directalign).

Convention (diffusers'): ``sigma = 1`` is pure noise, ``sigma = 0`` is data,

    x_sigma = sigma * eps + (1 - sigma) * x0,        velocity v = eps - x0,

so one Euler step from ``sigma`` to ``sigma_next`` is ``x + (sigma_next - sigma) * v`` and a state whose noise is
known recovers its clean endpoint in closed form, ``x0 = (x_sigma - sigma * eps) / (1 - sigma)``.

Direct-Align (arXiv 2509.06942, Eq. 5, and the official FLUX code) injects the known noise ``eps`` into a clean
latent ``x0`` at ``sigma_query``, lets the model move the state by ONE differentiable Euler step to ``sigma_target``,
and recovers ``x0_hat`` from the result with the known noise. The model therefore only supplies
``|sigma_query - sigma_target|`` (the paper's Delta-sigma) of the noise; the ground truth supplies the rest.

* denoise branch: ``sigma_query > sigma_target`` (one step down in noise);
* inversion branch: ``sigma_query < sigma_target`` (one step up in noise); its gradient on the model has the
  opposite sign, which is why SRPO swaps the positive and negative control words there.

Shapes: latents ``x`` are any shape (B, ...); per-sample sigmas are (B,) tensors or python floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma (B,)) -> v, same shape as x


def _expand(sigma: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a scalar or (B,) sigma against a (B, ...) tensor, on its device and dtype."""
    s = torch.as_tensor(sigma, device=like.device, dtype=like.dtype)
    if s.ndim == 0:
        return s
    return s.reshape(-1, *([1] * (like.ndim - 1)))


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3/FLUX time shift ``s * t / (1 + (s - 1) * t)``: maps [0, 1] onto itself, fixes 0 and 1, and for s > 1
    spends more of a schedule at high noise."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigma_schedule(num_steps: int, shift: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (num_steps + 1,) descending schedule ``shift(linspace(1, 0, num_steps + 1))``, from 1 to 0."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=dtype), shift)


def diffusers_sigma_schedule(num_steps: int, shift: float = 1.0, train_timesteps: int = 1000,
                             dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The (num_steps + 1,) schedule of diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(n)``
    (no dynamic shifting), as Flow-GRPO's SD3 pipeline samples it (yifan123/flow_grpo ``pipeline_with_logprob``
    calls ``retrieve_timesteps`` without sigmas): ``shift(linspace(1, shift(1 / T), n))`` then 0, T the training
    timesteps. The shift is applied to a range whose low end is already shifted, so the last step before 0 sits at
    ``shift(shift(1 / T))`` (0.0089 for shift 3), not at ``shift(1 / n)``."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    sigma_min = shift_sigmas(torch.tensor(1.0 / train_timesteps, dtype=dtype), shift)
    sigmas = shift_sigmas(torch.linspace(1.0, float(sigma_min), num_steps, dtype=dtype), shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def interpolate(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """``x_sigma = sigma * noise + (1 - sigma) * x0`` (the forward process, Eq. 4 with alpha = 1 - sigma)."""
    s = _expand(sigma, x0)
    return s * noise + (1 - s) * x0


def euler_step(x: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float,
               sigma_next: torch.Tensor | float) -> torch.Tensor:
    """One Euler step of the probability-flow ODE dx/dsigma = v from sigma to sigma_next (either direction)."""
    return x + (_expand(sigma_next, x) - _expand(sigma, x)) * velocity


def recover_x0(x: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Closed-form clean endpoint of a state whose noise is known: ``(x - sigma * noise) / (1 - sigma)``.

    Requires sigma < 1 (at sigma = 1 the state holds no information about x0).
    """
    s = _expand(sigma, x)
    return (x - s * noise) / (1 - s)


def euler_ode(x: torch.Tensor, sigmas: torch.Tensor, velocity_fn: VelocityFn) -> torch.Tensor:
    """Integrate the ODE along ``sigmas`` (descending, e.g. from :func:`sigma_schedule`) with Euler steps."""
    for i in range(len(sigmas) - 1):
        s = sigmas[i].to(x.dtype).expand(x.shape[0])
        x = euler_step(x, velocity_fn(x, s), sigmas[i], sigmas[i + 1])
    return x


def direct_align_x0(x0: torch.Tensor, noise: torch.Tensor, sigma_query: torch.Tensor | float,
                    sigma_target: torch.Tensor | float, velocity_fn: VelocityFn) -> torch.Tensor:
    """Direct-Align's one-step recovery (paper Eq. 5; official ``x0_hat = (x_b - sigma_b * eps) / (1 - sigma_b)``).

    Injects ``noise`` into ``x0`` at ``sigma_query``, queries the model once there, takes one Euler step to
    ``sigma_target`` and recovers the clean latent with the known noise. Equivalently
    ``x0_hat = (x_q + (sigma_target - sigma_query) * v - sigma_target * noise) / (1 - sigma_target)``.
    With the exact velocity ``noise - x0`` it returns ``x0`` for any pair of sigmas in [0, 1).
    Gradients reach the model only through ``v``, scaled by ``(sigma_target - sigma_query) / (1 - sigma_target)``.
    """
    x0 = x0.detach()
    noise = noise.detach()
    xq = interpolate(x0, noise, sigma_query)
    sq = torch.as_tensor(sigma_query, device=x0.device, dtype=x0.dtype)
    v = velocity_fn(xq, sq.expand(x0.shape[0]) if sq.ndim == 0 else sq)
    return recover_x0(euler_step(xq, v, sigma_query, sigma_target), noise, sigma_target)


def quantize_sigma(sigma: torch.Tensor, levels: int = 1000) -> torch.Tensor:
    """The official code feeds the model ``int(sigma * 1000) / 1000``; ``levels=0`` disables this."""
    if levels <= 0:
        return sigma
    return torch.floor(sigma * levels) / levels


# ------------------------------------------------------------------------------------------- the training window
def training_sigma_grid(schedule_steps: int, shift: float, t0: int, t1: int, n: int) -> torch.Tensor:
    """The official fine grid: ``linspace(sched[t0], sched[t1], n)`` with ``sched = sigma_schedule(schedule_steps,
    shift)``. ``t0 < t1`` are indices on the model's inference schedule; the grid runs from high to low sigma.

    FLUX HPS script: ``training_sigma_grid(50, 3, 5, 25, 1000)`` spans 0.9643 -> 0.75.
    """
    if not 0 <= t0 < t1 <= schedule_steps:
        raise ValueError(f"need 0 <= t0 < t1 <= {schedule_steps}, got t0={t0}, t1={t1}")
    sched = sigma_schedule(schedule_steps, shift)
    return torch.linspace(float(sched[t0]), float(sched[t1]), n, dtype=torch.float64)


def model_share_steps(n: int, groundtruth_ratio: float) -> int:
    """K, the number of grid steps the model covers: ``int((1 - groundtruth_ratio) * n) + 1`` (official; for
    ratio 0.9 and n = 1000 float rounding gives int(99.999...) + 1 = 100)."""
    if not 0.0 <= groundtruth_ratio < 1.0:
        raise ValueError(f"groundtruth_ratio must be in [0, 1), got {groundtruth_ratio}")
    return int((1 - groundtruth_ratio) * n) + 1


@dataclass(frozen=True)
class WindowDraw:
    """One random position in the training window and the sigmas both branches use there.

    ``m`` counts grid points from the late (least noisy) end, so a larger ``m`` is an earlier, noisier position.
    Denoise: query at ``grid[n-m-K]``, recover at ``grid[n-m]``. Inversion: query at ``grid[n-m2]`` (cleaner),
    recover at ``grid[n-m2-K]`` which equals ``grid[n-m]`` unless clamped. ``delta_sigma`` is the model's share.
    """

    m: int
    k_steps: int
    m_inversion: int
    denoise_query: float
    denoise_target: float
    inversion_query: float
    inversion_target: float

    @property
    def delta_sigma(self) -> float:
        return self.denoise_query - self.denoise_target


def draw_window(grid: torch.Tensor, groundtruth_ratio: float, generator: torch.Generator,
                margin: int = 5) -> WindowDraw:
    """Draw the position ``m ~ U{margin, ..., n - margin}`` (both ends included) and clamp K as the official code does.

    The official SRPO script (Tencent-Hunyuan/SRPO, ``fastvideo/SRPO.py``) draws
    ``random.randint(5, timestep_length - 5)``, inclusive, so m runs over 5..995 for n = 1000; here ``margin``
    plays the 5. Every grid index stays in ``[0, n - 1]`` for ``margin >= 1``, including at the new end
    ``m = n - margin``: the clamp ``k = min(n - m, K, m)`` keeps ``n - m - k >= 0`` (there ``k <= margin``) and
    ``n - m_inversion - k >= 0`` (``n - m`` unclamped, ``n - 1 - k`` with ``k <= m <= n - 1`` clamped), and
    ``m, m_inversion >= 1`` keep ``n - m`` and ``n - m_inversion`` at most ``n - 1``.
    """
    n = len(grid)
    if margin < 1:
        raise ValueError(f"margin must be >= 1, got {margin}")
    if n < 2 * margin + 2:
        raise ValueError(f"the training grid needs at least {2 * margin + 2} points, got {n}")
    m = int(torch.randint(margin, n - margin + 1, (1,), generator=generator))
    k = min(n - m, model_share_steps(n, groundtruth_ratio), m)
    m2 = max(m - k, 1)
    return WindowDraw(
        m=m,
        k_steps=k,
        m_inversion=m2,
        denoise_query=float(grid[n - m - k]),
        denoise_target=float(grid[n - m]),
        inversion_query=float(grid[n - m2]),
        inversion_target=float(grid[n - m2 - k]),
    )


def linear_ramp(start: float, end: float, n: int, index: int) -> float:
    """``linspace(start, end, n)[index]``: the official k schedules (``discount_pos``, ``discount_inv``)."""
    if n == 1:
        return start
    return start + (end - start) * index / (n - 1)


def multiplicative_discount(n: int, index: int, shift: float = 3.0) -> float:
    """The newer (Qwen-Image) code's multiplicative lambda(t): ``shift(s, linspace(0, 1, n + 1))[index]``."""
    t = index / n
    return shift * t / (1 + (shift - 1) * t)


def logit_normal_sigmas(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """SD3's logit-normal training sigmas (used for pretraining); (n,) in (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))
