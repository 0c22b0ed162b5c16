"""Our SDE step and log-probability against Flow-GRPO's own ``sde_step_with_logprob`` (yifan123/flow_grpo@ac4c86e
``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``), run by its code on tiny seeded inputs; the data comes from
``tools/flow_grpo_sde_reference.py`` (see there how to remake it)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DATA
from safetensors.torch import load_file

from directalign.methods import grpo_math

REF = DATA / "flow_grpo_sde_reference"


def _inputs():
    cfg = json.loads((REF / "config.json").read_text())
    t = load_file(str(REF / "reference.safetensors"))
    sig = torch.tensor(cfg["sigmas"])
    rows = torch.tensor(cfg["rows"])
    return cfg, t, sig[rows], sig[rows + 1], float(sig[1])


def test_transition_mean_and_std_match_flow_grpo():
    cfg, t, s, s_next, sigma_max = _inputs()
    mean, std = grpo_math.sde_step(t["sample"], t["model_output"], s, s_next, cfg["noise_level"], "flow", sigma_max)
    torch.testing.assert_close(mean, t["mean"], rtol=1e-5, atol=1e-6)
    # flow_grpo's std_dev_t is our diffusion coefficient g; the transition's std is g * sqrt(-dsigma)
    g = grpo_math.diffusion_coefficient(s, cfg["noise_level"], "flow", sigma_max)
    torch.testing.assert_close(g, t["std_dev_t"], rtol=1e-6, atol=0)
    torch.testing.assert_close(std.reshape(-1), t["std_dev_t"] * torch.sqrt(s - s_next), rtol=1e-6, atol=0)
    assert float(s[0]) == 1.0  # the first row exercises flow_grpo's substitution of sigmas[1] at sigma = 1


def test_log_probs_match_flow_grpo_for_a_given_and_a_sampled_target():
    cfg, t, s, s_next, sigma_max = _inputs()
    mean, std = grpo_math.sde_step(t["sample"], t["model_output"], s, s_next, cfg["noise_level"], "flow", sigma_max)
    for target, want in (("given_prev_sample", "given_log_prob"), ("sampled_prev_sample", "sampled_log_prob")):
        got = grpo_math.gaussian_log_prob(t[target], mean, std)
        torch.testing.assert_close(got, t[want], rtol=1e-5, atol=1e-5)
    # the sampled target is a draw of this transition: its standardised residual is ~N(0, 1)
    z = (t["sampled_prev_sample"] - mean) / std
    assert abs(float(z.mean())) < 0.5 and 0.6 < float(z.std()) < 1.4


# --------------------------------------------------------------------------------- the SD3 pipeline's schedule
@pytest.mark.parametrize("steps,shift", [(10, 3.0), (6, 3.0), (40, 1.0), (2, 5.0)])
def test_diffusers_schedule_equals_the_sd3_schedulers_set_timesteps(steps, shift):
    """Flow-GRPO's SD3 pipeline samples on ``FlowMatchEulerDiscreteScheduler.set_timesteps(N)``; ``grpo.schedule:
    diffusers`` gives the same sigmas (the linspace schedule does not: its last step sits at shift(1 / N))."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from directalign import flow

    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(steps)
    ours = flow.diffusers_sigma_schedule(steps, shift)
    torch.testing.assert_close(ours.float(), sch.sigmas.float(), rtol=1e-6, atol=1e-7)
    assert not torch.allclose(flow.sigma_schedule(steps, shift).float(), sch.sigmas.float(), atol=1e-3)


def test_grpo_samples_on_the_schedule_its_config_names(random_world):
    from helpers import build_parts, tiny_config

    from directalign import flow

    for name, expected in (("linspace", flow.sigma_schedule(3, 3.0)),
                           ("diffusers", flow.diffusers_sigma_schedule(3, 3.0))):
        cfg = tiny_config("grpo", f"grpo.schedule={name}", "grpo.sampling_steps=3", "sampling.shift=3.0")
        _, _, method, _ = build_parts(cfg)
        torch.testing.assert_close(method.sigmas, expected)
