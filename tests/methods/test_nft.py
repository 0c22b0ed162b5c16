"""DiffusionNFT (directalign.methods.nft): the loss on a worked example against a hand computation, the advantage
-> optimality map, the old policy's EMA and its decay schedule, a step that trains only the LoRA with the old policy
intact, exact resume with the old policy restored from the checkpoint, and the shipped configs (the real-model ones
on tiny random SD3 / FLUX pipelines)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import DATA, build_parts, context, quiet, tiny_config
from safetensors.torch import load_file

from directalign.config import load_config, packaged_config
from directalign.engine.config import ConfigError
from directalign.logging_utils import read_metrics
from directalign.methods.nft import (
    ema_update,
    group_advantages,
    nft_loss,
    old_decay,
    optimality,
)
from directalign.training import train

OWN = {"nft_reward", "nft_sigma", "nft_loss_pos", "nft_loss_neg", "nft_kl", "nft_old_deviation", "nft_old_drift",
       "nft_old_decay", "nft_adv_abs", "nft_zero_std_fraction"}


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------------- pure math
def test_loss_matches_a_hand_computation():
    """Two samples of two elements; every number below is worked out by hand from the module's formula."""
    x0 = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    x_t = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    t = torch.tensor([0.5, 0.5])
    v_theta = torch.tensor([[0.0, 2.0], [2.0, 0.0]], requires_grad=True)
    v_old = torch.tensor([[0.0, 0.0], [2.0, -2.0]])
    v_ref = torch.tensor([[1.0, 1.0], [2.0, 0.0]])
    r = torch.tensor([1.0, 0.25])
    beta, kl_beta, scale = 0.5, 0.1, 5.0
    # sample 0: v+ = 0.5 v_theta + 0.5 v_old = (0, 1); x0+ = x_t - 0.5 v+ = (1, 0.5); |x0+ - x0| = (0, 0.5)
    #           w+ = 0.25; pos = mean((0, 0.25) / 0.25) = 0.5
    #           v- = 1.5 v_old - 0.5 v_theta = (0, -1); x0- = (1, 1.5); |x0- - x0| = (0, 1.5); w- = 0.75;
    #           neg = mean((0, 2.25) / 0.75) = 1.5
    # sample 1: v+ = (2, -1); x0+ = (0, 1.5); |.| = (0, 0.5); w+ = 0.25; pos = 0.5
    #           v- = (2, -3); x0- = (0, 2.5); |.| = (0, 0.5); w- = 0.25; neg = 0.5
    pos = torch.tensor([1.0 * 0.5, 0.25 * 0.5]) / beta * scale  # (5.0, 1.25)
    neg = torch.tensor([0.0 * 1.5, 0.75 * 0.5]) / beta * scale  # (0.0, 3.75)
    # kl: sample 0 mean((-1, 1)^2) = 1; sample 1 mean((0, 0)^2) = 0 -> 0.5
    want = float((pos + neg).mean()) + kl_beta * 0.5  # 5.0 + 0.05
    loss, terms = nft_loss(v_theta, v_old, v_ref, x_t, x0, t, r, beta, kl_beta, scale)
    assert float(loss.detach()) == pytest.approx(5.05, abs=1e-6) and want == pytest.approx(5.05, abs=1e-6)
    assert float(terms["loss_pos"]) == pytest.approx(3.125, abs=1e-6)
    assert float(terms["loss_neg"]) == pytest.approx(1.875, abs=1e-6)
    assert float(terms["kl"]) == pytest.approx(0.5, abs=1e-6)
    # old deviation: sample 0 mean((0, 2)^2) = 2; sample 1 mean((0, 2)^2) = 2
    assert float(terms["old_deviation"]) == pytest.approx(2.0, abs=1e-6)
    # the gradient treats the weights as constants: d loss / d v_theta for sample 0, element 1:
    # pos: r * 2 (x0+ - x0) * (-t beta) / w+ / 2 elements / beta * scale / 2 samples = 1 * 2*0.5*(-0.25)/0.25/2/0.5*5/2
    # neg: 0; kl: 0.1 * 2 * (2 - 1) / 2 / 2 = 0.05
    loss.backward()
    assert float(v_theta.grad[0, 1]) == pytest.approx(-2.5 + 0.05, abs=1e-6)


def test_loss_and_gradient_match_the_reference_code():
    """tests/data/nft_reference: the loss statements of NVlabs/DiffusionNFT@24af555 scripts/train_nft_sd3.py run on
    fixed tensors by tools/nft_reference.py (advantage clipping, r, adaptive weights, the adv_clip_max factor, KL)."""
    ref = load_file(str(DATA / "nft_reference" / "reference.safetensors"))
    settings = json.loads((DATA / "nft_reference" / "config.json").read_text())
    t = ref["t"]
    te = t.view(-1, 1, 1, 1)
    x_t = (1 - te) * ref["x0"] + te * ref["noise"]
    v = ref["forward_prediction"].clone().requires_grad_(True)
    r = optimality(ref["advantages"][:, 0], settings["adv_clip_max"])
    loss, terms = nft_loss(v, ref["old_prediction"], ref["ref_forward_prediction"], x_t, ref["x0"], t, r,
                           settings["beta"], settings["kl_beta"], settings["adv_clip_max"])
    loss.backward()
    assert float(loss.detach()) == pytest.approx(float(ref["loss"]), rel=1e-6)
    policy = (float(terms["loss_pos"]) + float(terms["loss_neg"])) / settings["adv_clip_max"]
    assert policy == pytest.approx(float(ref["unweighted_policy_loss"]), rel=1e-6)
    assert float(terms["kl"]) == pytest.approx(float(ref["kl_div_loss"]), rel=1e-6)
    assert float(terms["old_deviation"]) == pytest.approx(float(ref["old_deviate"]), rel=1e-6)
    torch.testing.assert_close(v.grad, ref["grad"], rtol=1e-5, atol=1e-7)


def test_loss_without_reference_has_no_kl_and_the_weights_are_clipped():
    x0 = torch.zeros(1, 3)
    v = torch.zeros(1, 3, requires_grad=True)
    loss, terms = nft_loss(v, torch.zeros(1, 3), None, x0, x0, torch.tensor([0.3]), torch.tensor([0.5]), 1.0, 1.0,
                           5.0)
    # x0+- = x0 exactly: w would be 0 and is clipped to 1e-5, so the loss is 0 and finite
    assert float(loss.detach()) == 0.0 and float(terms["kl"]) == 0.0
    loss.backward()
    assert torch.isfinite(v.grad).all()


def test_at_the_old_policy_the_gradient_is_proportional_to_2r_minus_1():
    """With v_theta = v_old both implicit policies equal v_theta: the halves cancel at r = 1/2 and flip sign."""
    g = torch.Generator().manual_seed(0)
    x0, x_t, v = (torch.randn(1, 8, generator=g) for _ in range(3))
    grads = []
    for r in (0.5, 0.8, 0.2):
        vt = v.clone().requires_grad_(True)
        nft_loss(vt, v, None, x_t, x0, torch.tensor([0.7]), torch.tensor([r]), 1.0, 0.0, 5.0)[0].backward()
        grads.append(vt.grad)
    assert grads[0].abs().max() < 1e-6
    torch.testing.assert_close(grads[1], -grads[2])
    assert grads[1].abs().max() > 1e-3


def test_optimality_maps_clipped_advantages_to_unit_interval():
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 1.0, 5.0, 7.0])
    torch.testing.assert_close(optimality(a, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.6, 1.0, 1.0]))
    torch.testing.assert_close(optimality(torch.tensor([0.5]), 1.0), torch.tensor([0.75]))


def test_group_advantages_use_the_group_mean_and_the_global_or_group_population_std():
    rewards = torch.tensor([1.0, 3.0, 10.0, 10.0])
    # group means 2 and 10; population std of all four: mean 6, deviations (-5, -3, 4, 4) -> sqrt(66 / 4)
    s = math.sqrt(66 / 4)
    torch.testing.assert_close(group_advantages(rewards, 2, True, 1e-4),
                               torch.tensor([-1 / (s + 1e-4), 1 / (s + 1e-4), 0.0, 0.0]))
    # per-group std: 1 and 0 -> the second group's advantages are 0 / 1e-4 = 0
    torch.testing.assert_close(group_advantages(rewards, 2, False, 1e-4),
                               torch.tensor([-1 / (1 + 1e-4), 1 / (1 + 1e-4), 0.0, 0.0]))


def test_old_decay_schedules_of_the_reference_code():
    # decay_type 1: flat 0, uprate 0.001, uphold 0.5
    assert [old_decay(s, 0, 0.001, 0.5) for s in (0, 1, 300, 500, 501, 10_000)] == \
        [0.0, 0.001, pytest.approx(0.3), 0.5, 0.5, 0.5]
    # decay_type 2: flat 75, uprate 0.0075, uphold 0.999
    assert [old_decay(s, 75, 0.0075, 0.999) for s in (0, 74, 75, 76, 200, 1000)] == \
        [0.0, 0.0, 0.0, pytest.approx(0.0075), pytest.approx(0.9375), 0.999]
    assert old_decay(123, 0, 0.0, 0.5) == 0.0  # decay_type 0: the old policy is the current one


def test_ema_update_in_place():
    old = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])}
    cur = {"a": torch.tensor([3.0, 6.0]), "b": torch.tensor([[4.0]])}
    ema_update(old, cur, 0.25)
    torch.testing.assert_close(old["a"], torch.tensor([2.5, 5.0]))  # 0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6
    torch.testing.assert_close(old["b"], torch.tensor([[3.0]]))
    ema_update(old, cur, 0.0)
    assert torch.equal(old["a"], cur["a"]) and torch.equal(old["b"], cur["b"])
    assert torch.equal(cur["a"], torch.tensor([3.0, 6.0]))  # the current weights are untouched


def test_config_validation_is_one_line():
    for bad in ("nft.beta=0", "nft.group_size=1", "nft.timestep_fraction=0", "nft.old_decay_max=1.0",
                "nft.timestep_sampling=logit"):
        with pytest.raises(ConfigError) as e:
            tiny_config("nft", bad)
        assert "\n" not in str(e.value) and "nft." in str(e.value)


# ------------------------------------------------------------------------------------------------- the recipe
def test_step_trains_the_lora_and_keeps_the_old_policy_until_the_next_step(random_world):
    cfg = tiny_config("nft", "nft.kl_beta=0.01")
    adapter, _, method, params = build_parts(cfg)
    named = {k: p for k, p in adapter.transformer.named_parameters() if p.requires_grad}
    before = {k: p.detach().clone() for k, p in named.items()}
    frozen = {k: v.clone() for k, v in adapter.transformer.state_dict().items() if "lora_" not in k}
    out = method.train_step(context(0, ["a red circle on a blue background"]), lambda loss: loss.backward())
    assert set(out.metrics) == OWN and all(math.isfinite(v) for v in out.metrics.values())
    assert out.metrics["nft_old_drift"] == 0.0 and out.metrics["nft_old_decay"] == 0.0
    # step 0: the old policy equals the weights; the swaps restored the trained weights exactly
    for k, p in named.items():
        assert torch.equal(p.detach(), before[k]) and torch.equal(method._old[k], before[k])
    assert all(p.grad is not None for p in params) and any(float(p.grad.abs().max()) > 0 for p in params)
    assert out.metrics["nft_kl"] > 0
    assert out.loss == pytest.approx(out.metrics["nft_loss_pos"] + out.metrics["nft_loss_neg"]
                                     + 0.01 * out.metrics["nft_kl"], rel=1e-5)
    for k, v in adapter.transformer.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, frozen[k]), k
    # an optimizer moves the weights; the next step moves the old policy towards them by 1 - decay(1) = 0.999
    with torch.no_grad():
        for p in params:
            p.add_(0.01 * torch.sign(p.grad))
    moved = {k: p.detach().clone() for k, p in named.items()}
    out1 = method.train_step(context(1, ["a red circle on a blue background"]), lambda loss: None)
    assert out1.metrics["nft_old_decay"] == pytest.approx(0.001)
    for k in named:
        torch.testing.assert_close(method._old[k], 0.001 * before[k] + 0.999 * moved[k])
    assert out1.metrics["nft_old_drift"] > 0
    nfe = method.nfe(1)
    # 3 rollout steps + 1 old + 1 reference call per sample without gradient, 1 with; 2 samples per prompt
    assert nfe == {"nfe_no_grad": 2 * (3 + 1 + 1), "nfe_grad": 2 * 1}


def test_micro_batches_accumulate_the_same_gradient(random_world):
    grads = []
    for micro in (0, 1):
        cfg = tiny_config("nft", f"nft.micro_batch={micro}", "nft.timestep_sampling=uniform",
                          "nft.timestep_fraction=0.67")
        _, _, method, params = build_parts(cfg)
        out = method.train_step(context(0, ["a red circle on a blue background"]), lambda loss: loss.backward())
        grads.append((out.loss, [p.grad.clone() for p in params]))
    (loss0, g0), (loss1, g1) = grads
    assert loss0 == pytest.approx(loss1, rel=1e-5)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert any(float(a.abs().max()) > 0 for a in g0)


def test_resume_continues_exactly_with_the_old_policy(random_world, tmp_path):
    """2 steps, stop, resume to 4 == 4 straight steps: bit-equal LoRA and old-policy weights and the same losses.
    A decay schedule that starts at step 1 makes the old policy differ from the weights after step 1."""
    extra = ("train.steps=4", "run.checkpoint_every=2",
             "nft.old_decay_rate=0.3", "nft.old_decay_max=0.9")
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_config("nft", *extra, run_dir=straight), log=quiet)
    train(tiny_config("nft", *extra, run_dir=split), log=quiet, max_steps_this_session=2)
    ck2 = split / "checkpoints" / "step-00000002"
    old2 = load_file(str(ck2 / "method.safetensors"))
    lora2 = load_file(str(ck2 / "trainable.safetensors"))
    assert old2 and all(k.startswith("old.") for k in old2)
    # after 2 steps the old policy is an EMA (decay 0.3 at step 1), not the weights themselves
    old2 = {k[len("old."):].replace(".default", ""): v for k, v in old2.items()}  # parameter -> peft names
    assert set(old2) == set(lora2)
    assert any(not torch.equal(v, lora2[k]) for k, v in old2.items())
    train(tiny_config("nft", *extra, run_dir=split), resume=True, log=quiet)
    a, b = straight / "checkpoints" / "step-00000004", split / "checkpoints" / "step-00000004"
    for name in ("trainable.safetensors", "method.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert set(wa) == set(wb) and wa
        for k in wa:
            assert torch.equal(wa[k], wb[k]), f"{name}: {k}"
    ra, rb = read_metrics(straight), read_metrics(split)
    assert [r["step"] for r in rb] == [1, 2, 3, 4]
    for x, y in zip(ra, rb):
        assert x["loss"] == y["loss"] and x["nft_old_drift"] == y["nft_old_drift"], x["step"]
        assert set(x) >= OWN


def test_resume_refuses_a_checkpoint_without_the_old_policy(random_world):
    cfg = tiny_config("nft")
    _, _, method, _ = build_parts(cfg)
    from directalign.errors import TrainingError

    with pytest.raises(TrainingError, match="no DiffusionNFT old policy"):
        method.load_state_dict({"old.nothing": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------- configs
def test_tiny_config_trains_two_steps(random_world, tmp_path):
    cfg = load_config(packaged_config("tiny-nft"), ["train.steps=2", "eval.before=false", "run.report=false",
                                                      "run.progress=false", "eval.seeds=[0]", "eval.steps=2",
                                                      "eval.best_of=1", "nft.rollout_steps=3", "nft.group_size=2",
                                                      "nft.timestep_fraction=0.34", "train.batch_size=1",
                                                      f"run.output_dir={tmp_path / 'run'}"])
    assert cfg.method == "nft"
    train(cfg, log=quiet)
    rec = read_metrics(tmp_path / "run")
    assert len(rec) == 2 and all(set(r) >= OWN for r in rec)


@pytest.mark.parametrize("name,family", [("sd35-nft", "sd3"), ("flux-dev-nft", "flux")])
def test_real_model_config_runs_a_step_on_a_tiny_pipeline_of_its_family(name, family, random_world):
    """The shipped real-model config, with the tiny pipeline instead of the hub weights and a cheap schedule."""
    from directalign.adapters.flux import FluxAdapter
    from directalign.adapters.sd3 import SD3Adapter
    from directalign.adapters.tiny import tiny_sd3_pipeline
    from directalign.engine.finetune import apply_finetune_mode
    from directalign.methods.registry import METHODS
    from directalign.rewards.registry import load_reward

    cfg = load_config(packaged_config(name))
    assert cfg.method == "nft" and cfg.model.family == family
    assert cfg.nft.beta == 1.0 and cfg.nft.kl_beta == 1e-4 and cfg.train.learning_rate == 3e-4
    assert cfg.nft.group_size == 24 and cfg.nft.rollout_steps == 10
    cheap = ["model.height=32", "model.width=32", "model.dtype=float32", "model.max_sequence_length=16",
             "nft.group_size=2", "nft.rollout_steps=2", "nft.timestep_fraction=0.5", "train.lora_rank=2",
             "train.lora_alpha=4", "train.mixed_precision=no", "reward.kind=tiny-world", "reward.path=tiny-world",
             "reward.form=absolute"]
    cfg = load_config(packaged_config(name), cheap)
    if family == "sd3":
        adapter = SD3Adapter(tiny_sd3_pipeline(0), max_sequence_length=16)
    else:
        from diffusers import FluxPipeline

        from directalign.world import architecture as arch

        torch.manual_seed(0)
        adapter = FluxAdapter(FluxPipeline(**arch.new_generator_components()), max_sequence_length=16)
    reward = load_reward(cfg.reward, torch.device("cpu"), "absolute")
    method = METHODS["nft"].build(cfg, adapter, reward)
    params = apply_finetune_mode(cfg.train, adapter)
    out = method.train_step(context(0, ["a red circle"]), lambda loss: loss.backward())
    assert math.isfinite(out.loss) and set(out.metrics) == OWN
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in params)
