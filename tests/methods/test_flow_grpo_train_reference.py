"""Our GRPO training-step loss against Flow-GRPO's own (yifan123/flow_grpo@ac4c86e ``scripts/train_sd3.py``, the
statements of its accumulate block before ``accelerator.backward``: log-prob, ratio, PPO clip with clipped advantages,
KL to the reference, approx_kl, clipfrac), run by its code on tiny seeded inputs; the data comes from
``tools/flow_grpo_train_reference.py`` (see there how to remake it)."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch
from helpers import DATA
from safetensors.torch import load_file

from directalign.methods import grpo_math
from directalign.methods.grpo import GRPO

REF = DATA / "flow_grpo_train_reference"


def _load():
    cfg = json.loads((REF / "config.json").read_text())
    t = load_file(str(REF / "reference.safetensors"))
    sig = torch.tensor(cfg["sigmas"])
    rows = torch.tensor(cfg["rows"])
    return cfg, t, sig, rows


def test_pure_loss_kl_and_gradient_match_flow_grpo():
    cfg, t, sig, rows = _load()
    s, s_next, sigma_max = sig[rows], sig[rows + 1], float(sig[1])
    v = t["noise_pred"].clone().requires_grad_(True)
    mean, std = grpo_math.sde_step(t["latents"], v, s, s_next, cfg["noise_level"], "flow", sigma_max)
    mean_ref, _ = grpo_math.sde_step(t["latents"], t["noise_pred_ref"], s, s_next, cfg["noise_level"], "flow",
                                     sigma_max)
    torch.testing.assert_close(mean.detach(), t["prev_sample_mean"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mean_ref, t["prev_sample_mean_ref"], rtol=1e-5, atol=1e-6)
    log_prob = grpo_math.gaussian_log_prob(t["next_latents"], mean, std)
    torch.testing.assert_close(log_prob.detach(), t["log_prob"], rtol=1e-5, atol=1e-5)
    # the reference clamps the advantages inside the loss; GRPO.advantages clamps them once per rollout
    adv = t["advantages"].clamp(-cfg["adv_clip_max"], cfg["adv_clip_max"])
    policy, ratio = grpo_math.clipped_policy_loss(log_prob, t["old_log_probs"], adv, cfg["clip_range"])
    torch.testing.assert_close(ratio.detach(), t["ratio"], rtol=1e-5, atol=0)
    kl = grpo_math.transition_kl(mean, mean_ref, std, s, s_next, "flow_grpo").mean()
    loss = policy + cfg["beta"] * kl
    loss.backward()
    assert float(policy.detach()) == pytest.approx(float(t["policy_loss"]), rel=1e-5)
    assert float(kl.detach()) == pytest.approx(float(t["kl_loss"]), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(t["loss"]), rel=1e-5)
    assert float(grpo_math.approx_kl(log_prob, t["old_log_probs"])) == pytest.approx(float(t["approx_kl"]), rel=1e-5)
    clip_fraction = float(((ratio.detach() - 1).abs() > cfg["clip_range"]).float().mean())
    assert clip_fraction == pytest.approx(float(t["clipfrac"])) and 0 < clip_fraction < 1
    torch.testing.assert_close(v.grad, t["grad_noise_pred"], rtol=1e-4, atol=1e-9)
    # row 0 is clipped from above with A > 0: only the KL reaches it; the others carry the policy gradient
    per_row = v.grad.flatten(1).abs().amax(1)
    assert per_row[0] < 1e-6 < float(per_row[1:].min())


def test_exact_kl_is_flow_grpo_kl_divided_by_the_step():
    """Where we differ on purpose (``kl_form: exact``, the default): the transition's KL, flow_grpo's divided by
    ``sigma - sigma_next`` per sample (flow_grpo divides by ``2 std_dev_t^2`` without the ``sqrt(-dt)`` factor)."""
    cfg, t, sig, rows = _load()
    s, s_next = sig[rows], sig[rows + 1]
    _, std = grpo_math.sde_step(t["latents"], t["noise_pred"], s, s_next, cfg["noise_level"], "flow", float(sig[1]))
    exact = grpo_math.transition_kl(t["prev_sample_mean"], t["prev_sample_mean_ref"], std, s, s_next, "exact")
    assert float((exact * (s - s_next)).mean()) == pytest.approx(float(t["kl_loss"]), rel=1e-5)
    assert float(exact.mean()) > 2 * float(t["kl_loss"])  # steps of 0.1-0.3: the exact KL is several times larger


def test_train_part_of_the_recipe_matches_flow_grpo():
    """``GRPO._train_part`` (indexing of the stored rollout, the per-transition share, backward, diagnostics) on the
    reference's rollout: one part, one trained transition per sample, a model that returns the reference's
    predictions (the policy's, or the base model's inside ``reference_model``)."""
    cfg, t, sig, rows = _load()
    n, b = len(sig) - 1, len(rows)
    states = torch.zeros(n, b, *t["latents"].shape[1:])
    states[rows, torch.arange(b)] = t["latents"]
    states[rows + 1, torch.arange(b)] = t["next_latents"]
    old = torch.zeros(n - 1, b)
    old[rows, torch.arange(b)] = t["old_log_probs"]
    v = t["noise_pred"].clone().requires_grad_(True)
    state = {"ref": False}

    def velocity_for(embeds):
        def velocity(x, sigma):
            torch.testing.assert_close(x, t["latents"][embeds], rtol=0, atol=0)
            torch.testing.assert_close(sigma, sig[rows][embeds], rtol=0, atol=0)
            return t["noise_pred_ref"][embeds] if state["ref"] else v[embeds]
        return velocity

    @contextlib.contextmanager
    def reference_model():
        state["ref"] = True
        try:
            yield
        finally:
            state["ref"] = False

    recipe = object.__new__(GRPO)
    recipe.g = SimpleNamespace(sampling_steps=n, eta=cfg["noise_level"], sde="flow", clip_range=cfg["clip_range"],
                               kl_beta=cfg["beta"], kl_form="flow_grpo", micro_batch=0)
    recipe.sigmas = sig.double()
    recipe.adapter = SimpleNamespace(encode_prompts=lambda prompts: torch.arange(len(prompts)))
    recipe._velocity = velocity_for
    recipe.reference_model = reference_model
    adv = t["advantages"].clamp(-cfg["adv_clip_max"], cfg["adv_clip_max"])
    buf = {"states": states, "log_probs": old, "advantages": adv, "chosen": rows[:, None],
           "rewards": torch.zeros(b), "prompts": ["p"] * b}
    result = recipe._train_part(buf, torch.arange(b), lambda loss: loss.backward())
    assert result.loss == pytest.approx(float(t["loss"]), rel=1e-5)
    assert result.extra["kl"] == pytest.approx(float(t["kl_loss"]), rel=1e-5)
    assert result.extra["approx_kl"] == pytest.approx(float(t["approx_kl"]), rel=1e-5)
    assert result.extra["clip_fraction"] == pytest.approx(float(t["clipfrac"]))
    torch.testing.assert_close(v.grad, t["grad_noise_pred"], rtol=1e-4, atol=1e-9)
