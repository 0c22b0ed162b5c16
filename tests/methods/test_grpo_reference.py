"""Our SDE step and log-probability against Flow-GRPO's own ``sde_step_with_logprob`` (yifan123/flow_grpo@ac4c86e
``flow_grpo/diffusers_patch/sd3_sde_with_logprob.py``), run by its code on tiny seeded inputs; the data comes from
``tools/flow_grpo_sde_reference.py`` (see there how to remake it)."""

from __future__ import annotations

import json

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
