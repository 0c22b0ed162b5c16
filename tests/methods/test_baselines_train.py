"""The baseline recipes (plain Direct-Align, ReFL, DRaFT-K, DRaFT-LV, AlignProp, GRPO) on the random-weight tiny
world: where gradients go, how many model calls they make, GRPO's on-policy ratio / reference model /
non-differentiable rewards, and 2-step engine runs that change the LoRA weights and resume bit-exactly."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from helpers import PROMPTS, build_parts, quiet, run_step, tiny_config
from safetensors.torch import load_file

from directalign.logging_utils import read_metrics
from directalign.methods.registry import METHODS as REGISTRY
from directalign.rewards.base import Reward
from directalign.training import train

BASELINES = ["direct-align", "refl", "draft-k", "draft-lv", "alignprop", "grpo"]
# the name of each recipe's one pass in StepOutput.metrics (<pass>_reward, <pass>_sigma, ...)
PASS = {"direct-align": "denoise", "refl": "refl", "draft-k": "draft_k", "draft-lv": "draft_lv",
        "alignprop": "alignprop", "grpo": "grpo"}


def _setup(method, *overrides, finetune=True, perturb_lora=True):
    cfg = tiny_config(method, *overrides)
    adapter, reward, method_obj, params = build_parts(cfg, finetune=finetune, perturb_lora=perturb_lora)
    return cfg, adapter, reward, method_obj, params


class CallCounter:
    """Counts transformer evaluations per sample (batch rows), split by whether gradient is recorded, until frozen
    (the backward pass of a checkpointed chain recomputes calls; those are not model evaluations of the recipe)."""

    def __init__(self, adapter):
        self.grad, self.no_grad, self.frozen = 0, 0, False
        orig = adapter.velocity

        def counted(x, *a, **k):
            if not self.frozen:
                if torch.is_grad_enabled():
                    self.grad += x.shape[0]
                else:
                    self.no_grad += x.shape[0]
            return orig(x, *a, **k)

        adapter.velocity = counted


# ------------------------------------------------------------------------------------------ one step, by hand
@pytest.mark.parametrize("method", BASELINES)
def test_gradients_reach_only_lora_and_nfe_is_counted(random_world, method):
    cfg, adapter, reward, m, params = _setup(method)
    counter = CallCounter(adapter)
    losses = []

    def backward(loss):
        counter.frozen = True
        losses.append(float(loss.detach()))
        loss.backward()
        counter.frozen = False

    out = run_step(m, 0, PROMPTS[: cfg.train.batch_size], 3, backward=backward)
    # one pass per step, under the recipe's own name
    name = PASS[method]
    assert [k for k in out.metrics if k.endswith("_reward")] == [f"{name}_reward"]
    assert out.loss == pytest.approx(sum(losses), rel=1e-6, abs=1e-9)

    lora = {n: p for n, p in adapter.transformer.named_parameters() if "lora_" in n}
    assert {id(p) for p in lora.values()} == {id(p) for p in params}
    for n, p in lora.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert any(float(p.grad.abs().max()) > 0 for p in lora.values())
    for n, p in adapter.transformer.named_parameters():
        if "lora_" not in n:
            assert p.grad is None, f"base weight {n} got a gradient"
    for label, module in (("vae", adapter.vae), ("text_encoder", adapter.pipe.text_encoder), ("reward", reward)):
        for n, p in module.named_parameters():
            assert p.grad is None, f"{label}.{n} got a gradient"

    b = cfg.train.batch_size
    nfe = m.nfe(b)
    sigma = out.metrics[f"{name}_sigma"]
    if method == "refl":
        k = [i for i, s in enumerate(m.sigmas.tolist()) if abs(s - sigma) < 1e-9][0]
        assert (counter.no_grad, counter.grad) == (k * b, b)
        assert nfe == {"nfe_no_grad": 1.5 * b, "nfe_grad": b}
    elif method == "alignprop":
        bidx = [i for i, s in enumerate(m.sigmas.tolist()) if abs(s - sigma) < 1e-9][0]
        assert (counter.no_grad, counter.grad) == (bidx * b, (3 - bidx) * b)
        assert nfe == pytest.approx({"nfe_no_grad": 0.5 * b, "nfe_grad": 2.5 * b})
    else:
        assert (counter.no_grad, counter.grad) == (nfe["nfe_no_grad"], nfe["nfe_grad"])


def test_draft_k1_has_one_differentiable_call_per_sample(random_world):
    cfg, adapter, reward, m, params = _setup("draft-k", "draft.k=1")
    counter = CallCounter(adapter)
    run_step(m, 0, PROMPTS, 5)
    assert (counter.no_grad, counter.grad) == (2 * len(PROMPTS), len(PROMPTS))
    assert any(float(p.grad.abs().max()) > 0 for p in params)


# ---------------------------------------------------------------------------------------------------- GRPO
def test_grpo_is_on_policy_and_its_rollout_log_probs_recompute(random_world):
    cfg, adapter, reward, m, params = _setup("grpo", "grpo.sampling_steps=4", "grpo.group_size=3")
    gen = torch.Generator().manual_seed(0)
    noise = adapter.noise(1, 32, 32, torch.Generator().manual_seed(9))
    prompts = [PROMPTS[0]] * 3
    embeds = adapter.encode_prompts(prompts)
    x = m.initial_noise(noise, gen)
    assert torch.equal(x[0], x[1]) and torch.equal(x[0], x[2])  # same initial noise within the group
    ro = m.rollout(embeds, x, prompts, 0, gen, random.Random(0))
    assert ro.states.shape[0] == 4 and ro.log_probs.shape == (3, 3)
    assert ro.states.dtype == torch.float32 and ro.log_probs.dtype == torch.float32
    # recomputing each transition's log-prob from the stored states gives the stored values
    from directalign.methods import grpo

    velocity = m._velocity(embeds)
    for i in range(3):
        s = torch.full((3,), float(m.sigmas[i]))
        mean, std = grpo.sde_step(ro.states[i], velocity(ro.states[i], s), float(m.sigmas[i]),
                                  float(m.sigmas[i + 1]), cfg.grpo.eta, cfg.grpo.sde, float(m.sigmas[1]))
        torch.testing.assert_close(grpo.gaussian_log_prob(ro.states[i + 1], mean, std), ro.log_probs[i],
                                   rtol=0, atol=1e-6)
    # the SDE made the group's samples differ, so advantages are informative
    assert not torch.equal(ro.x0[0], ro.x0[1])
    out = run_step(m, 0, PROMPTS[:1], 1)
    assert out.metrics["grpo_max_ratio_deviation"] < 1e-5
    assert out.metrics["grpo_clip_fraction"] == 0.0  # on-policy: no ratio leaves 1 +- clip_range (1e-4)


@pytest.mark.parametrize("kl", [0.0, 0.5])
def test_grpo_micro_batches_accumulate_the_same_gradient(random_world, kl):
    def grads(micro):
        cfg, adapter, reward, m, params = _setup("grpo", f"grpo.micro_batch={micro}", "grpo.group_size=3",
                                                 f"grpo.kl_beta={kl}")
        out = run_step(m, 0, PROMPTS, 6)
        return out, [p.grad.clone() for p in params]

    r_all, g_all = grads(0)
    r_one, g_one = grads(2)  # 6 samples in chunks of 2
    assert r_one.loss == pytest.approx(r_all.loss, rel=1e-4, abs=1e-6)  # on-policy: sum(-A) ~ 0
    assert r_one.metrics["grpo_kl"] == pytest.approx(r_all.metrics["grpo_kl"], rel=1e-4, abs=1e-12)
    for a, b in zip(g_all, g_one):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-8)


def test_grpo_separate_noise_per_sample(random_world):
    cfg, adapter, reward, m, _ = _setup("grpo", "grpo.same_initial_noise=false", "grpo.group_size=3",
                                        finetune=False)
    noise = adapter.noise(2, 32, 32, torch.Generator().manual_seed(9))
    x = m.initial_noise(noise, torch.Generator().manual_seed(0))
    assert x.shape[0] == 6
    assert torch.equal(x[0], noise[0]) and torch.equal(x[3], noise[1])  # sample 0 of each group: the engine's
    assert not torch.equal(x[0], x[1]) and not torch.equal(x[1], x[2])


class _ConstantReward(Reward):
    """Scores every image 0.5 through a non-differentiable path (numpy)."""

    text_conditioned = True
    name = "constant"

    def encode_images(self, images):
        return torch.from_numpy(images.detach().cpu().numpy().mean(axis=(1, 2, 3)) * 0 + 0.5)

    def score_texts(self, state, texts):
        return state


class _NumpyReward(Reward):
    """A non-differentiable reward: mean red minus mean blue, computed in numpy."""

    text_conditioned = True
    name = "numpy"

    def encode_images(self, images):
        a = images.detach().cpu().numpy()
        return torch.from_numpy(a[:, 0].mean(axis=(1, 2)) - a[:, 2].mean(axis=(1, 2)))

    def score_texts(self, state, texts):
        return state


def test_grpo_trains_on_a_non_differentiable_reward(random_world):
    cfg, adapter, reward, _, params = _setup("grpo")
    m = REGISTRY["grpo"].build(cfg, adapter, _NumpyReward())
    out = run_step(m, 0, PROMPTS[:1], 2)
    assert torch.isfinite(torch.tensor(out.loss))
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in params)


def test_grpo_constant_reward_gives_zero_gradient(random_world):
    cfg, adapter, reward, _, params = _setup("grpo")
    m = REGISTRY["grpo"].build(cfg, adapter, _ConstantReward())
    out = run_step(m, 0, PROMPTS[:1], 2)
    assert out.loss == 0.0
    assert out.metrics["grpo_zero_std_fraction"] == 1.0  # every group's rewards were equal
    for p in params:
        assert p.grad is None or float(p.grad.abs().max()) == 0.0


def test_grpo_kl_reference_is_the_base_model_with_lora(random_world):
    # lora_B = 0: the adapted model equals the base, so the KL term is exactly 0
    cfg, adapter, reward, m, params = _setup("grpo", "grpo.kl_beta=0.5", perturb_lora=False)
    r0 = run_step(m, 0, PROMPTS[:1], 4)
    assert r0.metrics["grpo_kl"] == 0.0
    # with LoRA moved, the KL is positive, and the adapters are back on afterwards
    with torch.no_grad():
        for n, p in adapter.transformer.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    x = adapter.noise(1, 32, 32, torch.Generator().manual_seed(0))
    e = adapter.encode_prompts(PROMPTS[:1])
    s = torch.tensor([0.5])
    with torch.no_grad():
        v_before = adapter.velocity(x, s, e, 3.5, 32, 32)
        with m.reference_model():
            v_ref = adapter.velocity(x, s, e, 3.5, 32, 32)
    r1 = run_step(m, 0, PROMPTS[:1], 4)
    assert r1.metrics["grpo_kl"] > 0
    with torch.no_grad():
        v_after = adapter.velocity(x, s, e, 3.5, 32, 32)
    assert not torch.allclose(v_before, v_ref)
    assert torch.equal(v_before, v_after)
    assert all(p.requires_grad for p in params)


def test_grpo_kl_reference_is_a_frozen_copy_with_full_finetuning(random_world):
    cfg, adapter, reward, m, params = _setup("grpo", "grpo.kl_beta=0.5", "train.finetune=full")
    x = adapter.noise(1, 32, 32, torch.Generator().manual_seed(0))
    e = adapter.encode_prompts(PROMPTS[:1])
    s = torch.tensor([0.5])
    with torch.no_grad():
        v_base = adapter.velocity(x, s, e, 3.5, 32, 32)
        adapter.transformer.proj_out.weight.add_(0.1)
        v_moved = adapter.velocity(x, s, e, 3.5, 32, 32)
        with m.reference_model():
            v_ref = adapter.velocity(x, s, e, 3.5, 32, 32)
    assert not torch.allclose(v_base, v_moved)
    torch.testing.assert_close(v_ref, v_base, rtol=0, atol=0)
    assert adapter.transformer is not m._base.copy
    r = run_step(m, 0, PROMPTS[:1], 4)
    assert r.metrics["grpo_kl"] > 0
    assert all(p.grad is None for p in m._base.copy.parameters())


# ------------------------------------------------------------------------------------- engine: change + resume
def _ckpt(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors"))


@pytest.mark.parametrize("method", BASELINES)
def test_two_step_run_changes_lora_and_resumes_bit_exactly(random_world, tmp_path, method):
    def cfg(run):
        return tiny_config(method, "train.steps=2", "run.checkpoint_every=1", run_dir=run)

    a, b = tmp_path / "straight", tmp_path / "resumed"
    result = train(cfg(a), log=quiet)
    s1, s2 = _ckpt(a, 1), _ckpt(a, 2)
    assert s2 and all("lora_" in k for k in s2)
    for k in s2:
        assert not torch.equal(s1[k], s2[k]), f"{k} did not change on step 2"
        if "lora_B" in k:
            assert s2[k].abs().max() > 0, f"{k} is still zero"
    # the base transformer is untouched
    from diffusers import FluxPipeline

    fresh = FluxPipeline.from_pretrained(random_world / "generator", local_files_only=True).transformer.state_dict()
    for n, t in result.adapter.transformer.state_dict().items():
        if "lora_" not in n:
            assert torch.equal(t, fresh[n.replace(".base_layer.", ".")]), n
    assert "reward_after" in result.summary
    rec = read_metrics(a)
    assert [r["step"] for r in rec] == [1, 2]
    assert set(rec[0]) >= {"nfe_no_grad", "nfe_grad", "loss", "reward", f"{PASS[method]}_reward",
                           f"{PASS[method]}_sigma"}

    first = train(cfg(b), log=quiet, max_steps_this_session=1)
    assert first.summary == {"step": 1}
    train(cfg(b), resume=True, log=quiet, max_steps_this_session=1)
    tb = _ckpt(b, 2)
    assert set(tb) == set(s2)
    for k in s2:
        assert torch.equal(s2[k], tb[k]), f"{k} differs after resume"
    assert [(r["step"], r["loss"]) for r in read_metrics(b)] == [(r["step"], r["loss"]) for r in rec]


def test_grpo_step_moves_log_probs_toward_positive_advantages(random_world):
    """The direction check that no golden covers: a small gradient step on the GRPO loss raises the advantage-
    weighted log-probability sum(adv_i * log p_i) of the transitions it trained (first order: on-policy, the loss is
    -mean(adv * ratio)). A sign or a sample/advantage permutation error would lower it or leave it at chance."""
    from directalign.methods import grpo

    cfg, adapter, reward, m, params = _setup("grpo", "grpo.sampling_steps=4", "grpo.group_size=4",
                                             "grpo.updates_per_rollout=2", "grpo.same_initial_noise=false")
    run_step(m, 0, PROMPTS[:1], 1)  # part 0 of the rollout; the buffer keeps the rollout for part 1
    buf = m._buffer
    part = buf["order"][: int(buf["sizes"][0])]
    adv = buf["advantages"][part]
    assert adv.abs().sum() > 0

    def weighted_log_prob() -> float:
        embeds = adapter.encode_prompts(buf["prompts"])
        velocity = m._velocity(embeds[part])
        total = 0.0
        with torch.no_grad():
            for j in range(buf["chosen"].shape[1]):
                idx = buf["chosen"][part, j]
                x_t, x_next = buf["states"][idx, part], buf["states"][idx + 1, part]
                s, s_next = m.sigmas[idx].float(), m.sigmas[idx + 1].float()
                mean, std = grpo.sde_step(x_t, velocity(x_t, s), s, s_next, cfg.grpo.eta, cfg.grpo.sde,
                                          float(m.sigmas[1]))
                total += float((adv * grpo.gaussian_log_prob(x_next, mean, std)).sum())
        return total

    before = weighted_log_prob()
    with torch.no_grad():
        for p in params:
            p -= 1e-3 * p.grad / (p.grad.norm() + 1e-12)  # a small normalised gradient-descent step
    assert weighted_log_prob() > before
