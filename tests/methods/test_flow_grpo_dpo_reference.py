"""Our Diffusion-DPO loss against Flow-GRPO's own DPO step (yifan123/flow_grpo@ac4c86e ``scripts/train_sd3_dpo.py``,
the statements of its accumulate block before ``accelerator.backward``), run by its code on tiny seeded inputs; the
data comes from ``tools/flow_grpo_dpo_reference.py`` (see there how to remake it)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import DATA
from safetensors.torch import load_file

from directalign import flow
from directalign.methods.dpo import dpo_loss
from directalign.methods.matching import flow_matching_mse, logit_normal_train_sigmas

REF = DATA / "flow_grpo_dpo_reference"


def _load():
    return json.loads((REF / "config.json").read_text()), load_file(str(REF / "reference.safetensors"))


def test_loss_margin_accuracy_and_gradient_match_flow_grpo():
    cfg, t = _load()
    p = cfg["pairs"]
    pred = t["model_pred"].clone().requires_grad_(True)
    mse = flow_matching_mse(pred, t["latents"], t["noise"])
    ref = flow_matching_mse(t["model_pred_ref"], t["latents"], t["noise"])
    torch.testing.assert_close(mse.detach(), t["theta_mse"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ref, t["ref_mse"], rtol=1e-6, atol=1e-6)
    losses, inside = dpo_loss(mse[:p], mse[p:], ref[:p], ref[p:], cfg["beta"])
    loss = losses.mean()  # DPO.train_step at timestep_draws = 1: the mean over pairs, as the reference's torch.mean
    loss.backward()
    torch.testing.assert_close(inside.detach(), t["inside_term"], rtol=1e-4, atol=1e-5)
    assert float(loss.detach()) == pytest.approx(float(t["loss"]), rel=1e-5)
    # dpo_accuracy is the reference's implicit_acc; the data has pairs on both sides of 0
    assert float((inside > 0).float().mean()) == pytest.approx(float(t["implicit_acc"]))
    assert 0 < float(t["implicit_acc"]) < 1
    torch.testing.assert_close(pred.grad, t["grad_model_pred"], rtol=1e-4, atol=1e-7)
    assert float(pred.grad.abs().max()) > 1e-3


def test_noisy_input_shared_noise_and_sigma_draw_match_flow_grpo():
    cfg, t = _load()
    p = cfg["pairs"]
    torch.testing.assert_close(flow.interpolate(t["latents"], t["noise"], t["sigmas"]), t["noisy_model_input"],
                               rtol=1e-6, atol=1e-6)
    # winner and loser share noise and sigma
    torch.testing.assert_close(t["noise"][p:], t["noise"][:p], rtol=0, atol=0)
    torch.testing.assert_close(t["sigmas"][p:], t["sigmas"][:p], rtol=0, atol=0)
    # the reference draws noise for all 2P latents (keeping the first P), then u from the same RNG: replayed on a
    # generator in the same state, our logit-normal draw on the 1000-level schedule gives the same sigmas
    g = torch.Generator().manual_seed(cfg["block_seed"])
    torch.testing.assert_close(torch.randn(t["latents"].shape, generator=g)[:p], t["noise"][:p], rtol=0, atol=0)
    sig = logit_normal_train_sigmas(p, g, cfg["shift"], 0.0, 1.0, 1000)
    torch.testing.assert_close(sig, t["sigmas"][:p], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(t["timesteps"], t["sigmas"] * 1000, rtol=1e-6, atol=1e-4)
