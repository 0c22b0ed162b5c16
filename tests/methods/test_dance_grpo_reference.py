"""Our DanceGRPO SDE step (``grpo_math.sde_step(..., "dance")``, ``gaussian_log_prob``) and sigma schedule against
DanceGRPO's own ``flux_step`` and ``sd3_time_shift`` (XueZeyue/DanceGRPO@15cc71d ``fastvideo/train_grpo_flux.py``),
run by its code on tiny seeded inputs; the data comes from ``tools/dance_grpo_reference.py`` (see there how to
remake it)."""

from __future__ import annotations

import json

import torch
from helpers import DATA
from safetensors.torch import load_file

from directalign import flow
from directalign.methods import grpo_math
from directalign.methods.common import one_step_x0

REF = DATA / "dance_grpo_reference"


def _inputs():
    cfg = json.loads((REF / "config.json").read_text())
    t = load_file(str(REF / "reference.safetensors"))
    index = torch.tensor(cfg["indices"]).repeat_interleave(2)  # rows 2k, 2k + 1 use indices[k]
    sig = t["sigma_schedule"]
    return cfg, t, sig[index], sig[index + 1]


def test_schedule_matches_dance_grpo():
    cfg, t, _, _ = _inputs()
    ours = flow.sigma_schedule(cfg["steps"], cfg["shift"])
    torch.testing.assert_close(ours.float(), t["sigma_schedule"], rtol=1e-6, atol=1e-7)


def test_mean_x0_prediction_log_prob_and_gradient_match_flux_step():
    cfg, t, s, s_next = _inputs()
    v = t["model_output"].clone().requires_grad_(True)
    mean, std = grpo_math.sde_step(t["latents"], v, s, s_next, cfg["eta"], "dance")
    torch.testing.assert_close(mean.detach(), t["prev_sample_mean"], rtol=1e-5, atol=1e-6)
    # flux_step's std_dev_t = eta * sqrt(sigma - sigma_next): our g = eta times sqrt(-dsigma)
    torch.testing.assert_close(std.reshape(-1), cfg["eta"] * torch.sqrt(s - s_next), rtol=1e-6, atol=0)
    torch.testing.assert_close(one_step_x0(t["latents"], t["model_output"], s), t["pred_original_sample"],
                               rtol=1e-5, atol=1e-6)
    log_prob = grpo_math.gaussian_log_prob(t["given_prev_sample"], mean, std)
    torch.testing.assert_close(log_prob.detach(), t["given_log_prob"], rtol=1e-5, atol=1e-4)
    (t["weights"] * log_prob).sum().backward()
    torch.testing.assert_close(v.grad, t["grad_model_output"], rtol=1e-4, atol=1e-6)
    assert float(v.grad.abs().max()) > 1e-2
    assert float(s[0]) == 1.0 and float(s_next[-1]) == 0.0  # the ends of the schedule are exercised


def test_log_prob_of_flux_steps_own_draw():
    cfg, t, s, s_next = _inputs()
    mean, std = grpo_math.sde_step(t["latents"], t["model_output"], s, s_next, cfg["eta"], "dance")
    got = grpo_math.gaussian_log_prob(t["sampled_prev_sample"], mean, std)
    torch.testing.assert_close(got, t["sampled_log_prob"], rtol=1e-5, atol=1e-5)
    z = (t["sampled_prev_sample"] - mean) / std  # a draw of this transition: standardised residual ~N(0, 1)
    assert abs(float(z.mean())) < 0.3 and 0.8 < float(z.std()) < 1.2
