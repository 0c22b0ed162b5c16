"""Diffusion-DPO (``directalign.methods.dpo``): the loss against a hand computation, the logit-normal sigmas, pair
selection, the offline pair manifest and folder with their one-line errors, the reference refresh schedule (and
its exact resume), a real engine run of both data modes, and the shipped real-model config on a tiny SD3."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import build_parts, context, quiet, tiny_config
from real_config_sd3 import build_method, tiny_sd3_config
from safetensors.torch import load_file

from directalign.config import load_config, packaged_config
from directalign.data import DataError
from directalign.engine.config import ConfigError
from directalign.logging_utils import read_metrics
from directalign.methods.dpo import DPO, dpo_loss
from directalign.methods.matching import (
    best_and_worst,
    flow_matching_mse,
    logit_normal_train_sigmas,
)
from directalign.methods.pairs import load_pairs
from directalign.training import train
from directalign.world.export_pairs import export


# ------------------------------------------------------------------------------------------------- pure math
def test_dpo_loss_matches_a_hand_computation():
    mse_w, mse_l = torch.tensor([0.30, 0.50]), torch.tensor([0.40, 0.20])
    ref_w, ref_l = torch.tensor([0.32, 0.45]), torch.tensor([0.38, 0.25])
    loss, inside = dpo_loss(mse_w, mse_l, ref_w, ref_l, beta=100.0)
    # pair 0: (0.30 - 0.32) - (0.40 - 0.38) = -0.04 -> inside = -50 * -0.04 = 2.0
    # pair 1: (0.50 - 0.45) - (0.20 - 0.25) = 0.10 -> inside = -5.0
    assert inside.tolist() == pytest.approx([2.0, -5.0], abs=1e-5)
    want = [math.log1p(math.exp(-2.0)), math.log1p(math.exp(5.0))]  # -log sigmoid(z) = log(1 + e^-z)
    assert loss.tolist() == pytest.approx(want, rel=1e-5)


def test_dpo_gradient_pushes_winner_error_down_and_loser_error_up():
    mse_w = torch.tensor([0.3], requires_grad=True)
    mse_l = torch.tensor([0.3], requires_grad=True)
    loss, _ = dpo_loss(mse_w, mse_l, torch.tensor([0.3]), torch.tensor([0.3]), beta=10.0)
    loss.sum().backward()
    # at inside = 0: d/d mse_w = sigmoid(0) * beta / 2 = 2.5, d/d mse_l = -2.5
    assert float(mse_w.grad) == pytest.approx(2.5) and float(mse_l.grad) == pytest.approx(-2.5)


def test_flow_matching_mse_is_the_velocity_error():
    x0, eps = torch.zeros(2, 3), torch.ones(2, 3)
    v = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 3.0]])  # target eps - x0 = 1
    assert flow_matching_mse(v, x0, eps).tolist() == pytest.approx([0.0, 5.0 / 3.0])


def test_logit_normal_sigmas_index_the_shifted_training_schedule():
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    got = logit_normal_train_sigmas(6, g1, shift=3.0, levels=1000)
    u = torch.sigmoid(torch.randn(6, generator=g2)).double()
    t = 1 - torch.floor(u * 1000) / 1000
    want = 3 * t / (1 + 2 * t)  # FlowMatchEulerDiscreteScheduler(shift=3).sigmas[floor(1000 u)]
    assert torch.allclose(got.double(), want, atol=1e-6)
    assert ((got > 0) & (got <= 1)).all()


def test_logit_normal_sigmas_agree_with_diffusers_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    got = logit_normal_train_sigmas(16, g1, shift=3.0, levels=1000)
    idx = (torch.sigmoid(torch.randn(16, generator=g2)) * 1000).long()
    assert torch.allclose(got, sched.sigmas[idx].float(), atol=1e-5)


def test_best_and_worst_per_group_and_ties_as_flow_grpo():
    r = torch.tensor([0.1, 0.9, 0.5,   0.3, 0.3, 0.3,   2.0, -1.0, 0.0])
    win, lose = best_and_worst(r, 3)
    assert win.tolist() == [1, 4, 6] and lose.tolist() == [0, 3, 7]  # the tie group: samples 1 and 0


# ------------------------------------------------------------------------------------------------- offline pairs
def test_pair_manifest_and_folder_load(tmp_path):
    manifest = export(tmp_path / "pairs", 3)
    data = load_pairs(str(manifest), 32, 32)
    assert len(data) == 3 and data.winners.shape == (3, 3, 32, 32) == data.losers.shape
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert data.prompts == [r["prompt"] for r in rows]
    assert not torch.equal(data.winners, data.losers)
    # the same pairs as a folder: NAME.txt + NAME.winner.png + NAME.loser.png
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, r in enumerate(rows):
        (folder / f"p{i}.txt").write_text(r["prompt"])
        for role in ("winner", "loser"):
            (folder / f"p{i}.{role}.png").write_bytes((manifest.parent / r[role]).read_bytes())
    again = load_pairs(str(folder), 32, 32)
    assert again.prompts == data.prompts and torch.equal(again.winners, data.winners)


@pytest.mark.parametrize("line, match", [
    ("not json", r"pairs.jsonl:2 is not valid JSON"),
    ('{"prompt": "x", "winner": "00000.winner.png"}', r"pairs.jsonl:2 needs non-empty string fields"),
    ('{"prompt": "", "winner": "a.png", "loser": "b.png"}', r"pairs.jsonl:2 needs non-empty string fields"),
    ('{"prompt": "x", "winner": "00000.winner.png", "loser": "gone.png"}',
     r"pairs.jsonl:2: loser image gone.png does not exist"),
])
def test_bad_manifest_rows_are_one_line_errors(tmp_path, line, match):
    manifest = export(tmp_path / "pairs", 1)
    manifest.write_text(manifest.read_text() + line + "\n")
    with pytest.raises(DataError, match=match) as e:
        load_pairs(str(manifest), 32, 32)
    assert "\n" not in str(e.value)


def test_unreadable_image_and_missing_source_are_one_line_errors(tmp_path):
    manifest = export(tmp_path / "pairs", 2)
    (manifest.parent / "00001.loser.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"00001.loser.png is corrupt or truncated") as e:
        load_pairs(str(manifest), 32, 32)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"dpo.offline_data .* does not exist; make tiny-world pairs"):
        load_pairs(str(tmp_path / "nothing.jsonl"), 32, 32)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "a.txt").write_text("a prompt")
    (folder / "a.winner.png").write_bytes((manifest.parent / "00000.winner.png").read_bytes())
    with pytest.raises(DataError, match=r"has no loser image"):
        load_pairs(str(folder), 32, 32)


def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="dpo.data=offline needs dpo.offline_data"):
        tiny_config("dpo", "dpo.data=offline")
    with pytest.raises(ConfigError, match="makes every sample of a group identical"):
        tiny_config("dpo", "dpo.same_initial_noise=true")
    with pytest.raises(ConfigError, match="dpo.beta: must be > 0"):
        tiny_config("dpo", "dpo.beta=0")


# ------------------------------------------------------------------------------------------------- a step
def _capture_step(method, step, seed=3):
    """Run one step and return (output, [losses passed to backward])."""
    losses = []

    def backward(loss):
        losses.append(loss.detach())
        loss.backward()

    return method.train_step(context(step, seed=seed, prompts=["a red circle on a blue background"]), backward), \
        losses


def test_online_pairs_are_best_and_worst_of_groups_sharing_noise(random_world, monkeypatch):
    cfg = tiny_config("dpo", "dpo.group_size=3", "dpo.sampler=sde", "dpo.eta=0.7", "dpo.same_initial_noise=true")
    _adapter, _reward, method, _ = build_parts(cfg)
    seen = {}

    def score(images, prompts, step, rng):
        seen["rewards"] = torch.tensor([0.2, 0.9, 0.1])  # a known order: best 1, worst 2
        seen["images"] = images
        return seen["rewards"]

    monkeypatch.setattr(method, "score", score)
    from directalign.methods import dpo as dpo_mod

    noise_seen = {}
    orig = dpo_mod.sample_group

    def sample_group(adapter_, embeds, noise, *a, **k):
        noise_seen["noise"] = noise.clone()
        out = orig(adapter_, embeds, noise, *a, **k)
        noise_seen["x0"] = out.clone()
        return out

    monkeypatch.setattr(dpo_mod, "sample_group", sample_group)
    prompts, x_w, x_l, info = method.online_pairs(context(0, prompts=["a red circle on a blue background"]))
    n = noise_seen["noise"]
    assert torch.equal(n[0], n[1]) and torch.equal(n[0], n[2])  # one initial noise per group
    assert not torch.equal(noise_seen["x0"][0], noise_seen["x0"][1])  # the SDE still makes them differ
    assert torch.equal(x_w[0], noise_seen["x0"][1]) and torch.equal(x_l[0], noise_seen["x0"][2])
    assert info["reward_gap"] == pytest.approx(0.8) and prompts == ["a red circle on a blue background"]


def test_sde_sampler_tends_to_the_ode_as_its_noise_vanishes(random_world):
    from directalign.methods.matching import sample_group

    cfg = tiny_config("dpo")
    adapter, _reward, _method, _ = build_parts(cfg, finetune=False)
    embeds = adapter.encode_prompts(["a red circle on a blue background"] * 2)
    noise = adapter.noise(2, 32, 32, torch.Generator().manual_seed(0))

    def run(sampler, eta):
        return sample_group(adapter, embeds, noise, 4, 3.0, 5.0, 32, 32, sampler, eta, torch.Generator().manual_seed(1))

    ode = run("ode", 0.0)
    assert torch.allclose(run("sde", 1e-6), ode, atol=1e-4)
    assert (run("sde", 0.7) - ode).abs().max() > 1e-2  # real noise moves the samples


def test_first_step_loss_is_log2_when_the_policy_is_the_reference(random_world):
    # peft starts lora_B at zero: the policy is the base model, every margin is 0 and the loss is log 2
    cfg = tiny_config("dpo", "dpo.timestep_draws=2")
    _adapter, _reward, method, params = build_parts(cfg, perturb_lora=False)
    out, losses = _capture_step(method, 0)
    assert len(losses) == 2
    assert out.loss == pytest.approx(math.log(2.0), rel=1e-5)
    assert out.metrics["dpo_margin"] == pytest.approx(0.0, abs=1e-6) and out.metrics["dpo_accuracy"] == 0.0
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in params)


def test_reference_refresh_schedule(random_world):
    cfg = tiny_config("dpo", "dpo.ref_update_step=2")
    adapter, _reward, method, params = build_parts(cfg)
    assert [method.refresh_due(s) for s in range(6)] == [False, False, True, False, True, False]
    assert not method.snapshot and method.state_dict() == {}
    # with the base model as reference and perturbed LoRA weights the margins are not zero
    out0, _ = _capture_step(method, 0)
    assert abs(out0.metrics["dpo_margin"]) > 0
    with torch.no_grad():
        for p in params:
            p.add_(0.01)
    _capture_step(method, 2)  # refresh: the reference becomes the current policy
    state = method.state_dict()
    named = {n: p for n, p in adapter.transformer.named_parameters() if p.requires_grad}
    assert set(state) == {f"reference.{n}" for n in named}
    for n, p in named.items():
        assert torch.equal(state[f"reference.{n}"], p.detach())
    # right after a refresh the policy is its reference: every margin is 0 again
    out3, _ = _capture_step(method, 3)
    assert out3.metrics["dpo_margin"] == pytest.approx(0.0, abs=1e-5)
    assert out3.loss == pytest.approx(math.log(2.0), rel=1e-5)
    assert out3.metrics["dpo_ref_age"] == 1.0


# ------------------------------------------------------------------------------------------------- engine runs
def _ckpt(run: Path, step: int, name: str = "trainable.safetensors") -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / name))


def test_online_dpo_resumes_bit_exactly_with_its_reference(random_world, tmp_path):
    def cfg(run):
        return tiny_config("dpo", "train.steps=4", "run.checkpoint_every=1", "dpo.ref_update_step=2",
                           run_dir=run)

    a, b = tmp_path / "straight", tmp_path / "resumed"
    train(cfg(a), log=quiet)
    ref3 = _ckpt(a, 3, "method.safetensors")  # refreshed at step 2, saved with the step-3 checkpoint
    train(cfg(b), log=quiet, max_steps_this_session=3)
    train(cfg(b), resume=True, log=quiet)
    s4, t4 = _ckpt(a, 4), _ckpt(b, 4)
    assert set(s4) == set(t4)
    for k in s4:
        assert torch.equal(s4[k], t4[k]), f"{k} differs after resume"
    assert [(r["step"], r["loss"]) for r in read_metrics(b)] == [(r["step"], r["loss"]) for r in read_metrics(a)]
    assert ref3 and all(k.startswith("reference.") for k in ref3)
    # the saved reference matters: resuming without it (the base model as reference) gives another step 4
    c = tmp_path / "no-reference"
    train(cfg(c), log=quiet, max_steps_this_session=3)
    (c / "checkpoints" / "step-00000003" / "method.safetensors").unlink()
    train(cfg(c), resume=True, log=quiet)
    assert any(not torch.equal(s4[k], _ckpt(c, 4)[k]) for k in s4)


def test_offline_dpo_trains_from_a_manifest(random_world, tmp_path):
    manifest = export(tmp_path / "pairs", 4)
    run = tmp_path / "run"
    train(tiny_config("dpo", "dpo.data=offline", f"dpo.offline_data={manifest}", "train.steps=2", run_dir=run),
          log=quiet)
    rec = read_metrics(run)
    assert [r["step"] for r in rec] == [1, 2]
    assert {"dpo_accuracy", "dpo_margin", "dpo_w_diff", "dpo_l_diff", "dpo_sigma"} <= set(rec[0])
    assert "dpo_reward_gap" not in rec[0] and rec[0]["nfe_no_grad"] == rec[0]["nfe_grad"]  # no rollouts


def test_shipped_tiny_configs_load():
    for name in ("tiny-dpo", "tiny-dpo-offline"):
        cfg = load_config(packaged_config(name))
        assert cfg.method == "dpo"
    assert load_config(packaged_config("tiny-dpo-offline")).dpo.data == "offline"


def test_sd35_config_has_flow_grpo_settings_and_trains_on_a_tiny_sd3(random_world, tmp_path):
    cfg = load_config(packaged_config("sd35-dpo"))
    d = cfg.dpo
    assert (d.beta, d.group_size, d.sampling_steps, d.guidance, d.eta, d.timestep_draws, d.sampler) == (
        100.0, 24, 40, 4.5, 0.7, 39, "sde")
    assert cfg.sampling.shift == 3.0 and cfg.train.learning_rate == 3e-4 and cfg.model.family == "sd3"
    small = tiny_sd3_config("sd35-dpo", tmp_path, ["dpo.group_size=2", "dpo.sampling_steps=2",
                                                   "dpo.timestep_draws=1", "dpo.guidance=2.0"])
    method, params = build_method(small)
    assert isinstance(method, DPO)
    out, losses = _capture_step(method, 0)
    assert math.isfinite(out.loss) and len(losses) == 1
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in params)
