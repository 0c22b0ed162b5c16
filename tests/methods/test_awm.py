"""Advantage Weighted Matching (``directalign.methods.awm``): the weighted loss and its pieces against hand
computations, its gradient against the AWM code's on-policy PPO form, the KL-EMA schedule and its exact resume, and
the shipped real-model config on a tiny SD3."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import build_parts, context, quiet, tiny_config
from real_config_sd3 import build_method, tiny_sd3_config
from safetensors.torch import load_file

from directalign.config import load_config, packaged_config
from directalign.engine.config import ConfigError
from directalign.logging_utils import read_metrics
from directalign.methods.awm import (
    awm_advantages,
    ema_decay_at,
    timestep_indices,
    weighted_error,
)
from directalign.methods.matching import per_prompt_advantages
from directalign.training import train


# ------------------------------------------------------------------------------------------------- pure math
def test_per_prompt_advantages_with_global_std_by_hand():
    r = torch.tensor([1.0, 3.0, 0.0, 0.0])  # groups of 2: means 2 and 0
    # population std of all four: mean 1, deviations 0, 2, -1, -1 -> var 6/4 = 1.5
    adv = per_prompt_advantages(r, 2, eps=1e-4, global_std=True)
    s = math.sqrt(1.5) + 1e-4
    assert adv.tolist() == pytest.approx([-1 / s, 1 / s, 0.0, 0.0], rel=1e-6)
    local = per_prompt_advantages(r, 2, eps=1e-4, global_std=False)  # group std 1 and 0
    assert local.tolist() == pytest.approx([-1 / 1.0001, 1 / 1.0001, 0.0, 0.0], rel=1e-6)


def test_advantages_are_clipped_and_scaled_to_advantage_max():
    r = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 10.0])  # one outlier in a group of 8
    adv = awm_advantages(r, 8, eps=1e-4, global_std=True, clip=2.0, advantage_max=1.0)
    raw = per_prompt_advantages(r, 8, 1e-4, True)
    assert float(raw[-1]) > 2.0
    assert adv.tolist() == pytest.approx((raw.clamp(-2, 2) / 2).tolist(), rel=1e-6)
    assert float(adv.max()) == pytest.approx(1.0)


def test_weighted_error_forms_by_hand():
    mse, sigma = torch.tensor([0.25, 4.0]), torch.tensor([0.5, 1.0])
    assert weighted_error(mse, sigma, "uniform").tolist() == pytest.approx([0.25, 4.0])
    assert weighted_error(mse, sigma, "t").tolist() == pytest.approx([0.125, 4.0])
    p, tiny = 0.5, 1e-10
    want = [((0.25 + tiny) ** p - tiny ** p) * 0.5 / p, ((4.0 + tiny) ** p - tiny ** p) * 1.0 / p]
    assert weighted_error(mse, sigma, "ghuber", p).tolist() == pytest.approx(want, rel=1e-9)  # ~[0.5, 4.0]


def test_timestep_indices_are_one_per_stratum():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = timestep_indices(6, 14, 0.9, g)  # int(14 * 0.9) = 12: strata [0,2), [2,4), ..., [10,12)
        assert all(2 * k <= int(i) < 2 * k + 2 for k, i in enumerate(idx))
        wo = timestep_indices(2, 4, 0.9, g, skip_first=True)  # linspace(1, 3, 3) = 1, 2, 3
        assert wo.tolist() == [1, 2]


def test_ema_decay_schedule():
    assert [ema_decay_at(s, 0.3, 0.001) for s in (0, 1, 100, 300, 5000)] == pytest.approx([0, 0.001, 0.1, 0.3, 0.3])
    assert ema_decay_at(7, 0.3, 0.0) == 0.3


def test_gradient_equals_the_codes_on_policy_ppo_form():
    """The AWM code's loss is mean(max(-A r, -A clip(r))) with r = exp(log p - log p_old), log p = -w(mse), at
    r = 1; our mean(A * w(mse)) has the same gradient."""
    torch.manual_seed(0)
    theta = torch.randn(4, 3, requires_grad=True)
    target = torch.randn(4, 3)
    adv = torch.tensor([0.5, -1.0, 0.2, 0.3])
    sigma = torch.tensor([0.9, 0.9, 0.4, 0.4])

    def logp(t):
        return -weighted_error(((t - target) ** 2).mean(dim=1), sigma, "ghuber", 0.25)

    ours = (adv.double() * weighted_error(((theta - target) ** 2).mean(dim=1), sigma, "ghuber", 0.25)).mean()
    g_ours, = torch.autograd.grad(ours, theta)
    lp = logp(theta)
    ratio = torch.exp(lp - lp.detach())
    ppo = torch.maximum(-adv * ratio, -adv * ratio.clamp(0.0, 2.0)).mean()  # clip_range 1
    g_ppo, = torch.autograd.grad(ppo, theta)
    assert torch.allclose(g_ours, g_ppo, atol=1e-7)


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match=r"awm.train_timesteps: must be in \[1, 3\]"):
        tiny_config("awm", "awm.train_timesteps=4", "awm.sampling_steps=3")
    with pytest.raises(ConfigError, match="makes every sample of a group identical"):
        tiny_config("awm", "awm.same_initial_noise=true")


# ------------------------------------------------------------------------------------------------- a step
def _step(method, step):
    losses = []

    def backward(loss):
        losses.append(loss.detach())
        loss.backward()

    return method.train_step(context(step, prompts=["a red circle on a blue background"]), backward), losses


def test_step_loss_is_the_advantage_weighted_matching_loss(random_world, monkeypatch):
    """A step's loss equals mean(A * w(mse)) recomputed from the step's own samples, draws and advantages (no KL
    terms), and the policy's gradient flows to the LoRA weights."""
    cfg = tiny_config("awm", "awm.beta=0", "awm.ema_beta=0", "awm.weighting=uniform", "awm.group_size=3")
    _adapter, _reward, method, params = build_parts(cfg)
    from directalign.methods import awm as awm_mod

    seen = {}
    real_mse = awm_mod.flow_matching_mse

    def mse(v, x0, eps):
        out = real_mse(v, x0, eps)
        seen.setdefault("mse", []).append(out.detach())
        return out

    monkeypatch.setattr(awm_mod, "flow_matching_mse", mse)
    rewards = torch.tensor([0.1, 0.4, 0.7])
    monkeypatch.setattr(method, "score", lambda images, prompts, step, rng: rewards)
    out, losses = _step(method, 0)
    adv = awm_advantages(rewards, 3, 1e-4, True, 5.0, 1.0)
    want = sum(float((adv.double() * m.double()).mean()) for m in seen["mse"]) / len(seen["mse"])
    assert len(losses) == len(seen["mse"]) == cfg.awm.train_timesteps
    assert out.loss == pytest.approx(want, rel=1e-5)
    assert out.metrics["awm_advantage_std"] == pytest.approx(float(adv.std(unbiased=False)), rel=1e-5)
    assert out.metrics["awm_kl"] == 0.0 and out.metrics["awm_ema_kl"] == 0.0
    assert all(p.grad is not None for p in params) and any(p.grad.abs().max() > 0 for p in params)


def test_equal_rewards_give_no_policy_gradient(random_world, monkeypatch):
    cfg = tiny_config("awm", "awm.beta=0", "awm.ema_beta=0")
    _adapter, _reward, method, params = build_parts(cfg)
    monkeypatch.setattr(method, "score", lambda images, prompts, step, rng: torch.full((len(prompts),), 0.5))
    out, _ = _step(method, 0)
    assert out.loss == 0.0 and out.metrics["awm_zero_std_fraction"] == 1.0
    assert all(p.grad is None or not p.grad.any() for p in params)


def test_kl_ema_follows_the_policy(random_world):
    cfg = tiny_config("awm", "awm.ema_decay=0.3", "awm.ema_decay_ramp=0.1")
    adapter, _reward, method, params = build_parts(cfg)
    named = {n: p for n, p in adapter.transformer.named_parameters() if p.requires_grad}
    start = {n: p.detach().clone() for n, p in named.items()}
    out0, _ = _step(method, 0)  # the EMA starts as the initial weights: its KL is 0
    assert out0.metrics["awm_ema_kl"] == pytest.approx(0.0, abs=1e-12) and out0.metrics["awm_kl"] > 0
    with torch.no_grad():
        for p in params:
            p.add_(0.02)
    out1, _ = _step(method, 1)  # decay min(0.3, 0.1 * 1) = 0.1: ema = 0.1 start + 0.9 now
    assert out1.metrics["awm_ema_decay"] == pytest.approx(0.1)
    state = method.state_dict()
    for n, p in named.items():
        assert torch.allclose(state[f"kl_ema.{n}"], 0.1 * start[n] + 0.9 * p.detach(), atol=1e-6)
    assert out1.metrics["awm_ema_kl"] > 0


# ------------------------------------------------------------------------------------------------- engine runs
def _ckpt(run: Path, step: int, name: str = "trainable.safetensors") -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / name))


def test_awm_resumes_bit_exactly_with_its_ema_policy(random_world, tmp_path):
    def cfg(run):
        return tiny_config("awm", "train.steps=4", "run.checkpoint_every=1", "awm.ema_decay_ramp=0.1", run_dir=run)

    a, b = tmp_path / "straight", tmp_path / "resumed"
    train(cfg(a), log=quiet)
    train(cfg(b), log=quiet, max_steps_this_session=2)
    assert set(_ckpt(b, 2, "method.safetensors")) and all(k.startswith("kl_ema.")
                                                          for k in _ckpt(b, 2, "method.safetensors"))
    train(cfg(b), resume=True, log=quiet)
    s4, t4 = _ckpt(a, 4), _ckpt(b, 4)
    assert set(s4) == set(t4)
    for k in s4:
        assert torch.equal(s4[k], t4[k]), f"{k} differs after resume"
    assert [(r["step"], r["loss"]) for r in read_metrics(b)] == [(r["step"], r["loss"]) for r in read_metrics(a)]
    ea, eb = _ckpt(a, 4, "method.safetensors"), _ckpt(b, 4, "method.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    # the saved EMA policy matters: resuming without it (the EMA restarts from the resumed weights) differs
    c = tmp_path / "no-ema"
    train(cfg(c), log=quiet, max_steps_this_session=2)
    (c / "checkpoints" / "step-00000002" / "method.safetensors").unlink()
    train(cfg(c), resume=True, log=quiet)
    assert any(not torch.equal(s4[k], _ckpt(c, 4)[k]) for k in s4)


def test_shipped_tiny_config_loads():
    cfg = load_config(packaged_config("tiny-awm"))
    assert cfg.method == "awm" and cfg.awm.weighting == "ghuber"


def test_sd35_config_has_the_codes_settings_and_trains_on_a_tiny_sd3(random_world, tmp_path):
    cfg = load_config(packaged_config("sd35-awm"))
    a = cfg.awm
    assert (a.sampling_steps, a.group_size, a.train_timesteps, a.timestep_fraction, a.beta, a.ema_beta,
            a.ema_decay, a.ghuber_power) == (14, 24, 6, 0.9, 1e-4, 1.0, 0.3, 0.25)
    assert cfg.train.learning_rate == 3e-4 and cfg.train.lora_rank == 32 and cfg.model.family == "sd3"
    small = tiny_sd3_config("sd35-awm", tmp_path, ["awm.group_size=2", "awm.sampling_steps=3",
                                                   "awm.train_timesteps=1"])
    from directalign.methods.awm import AWM

    method, params = build_method(small)
    assert isinstance(method, AWM)
    out, losses = _step(method, 0)
    assert math.isfinite(out.loss) and len(losses) == 1
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in params)

