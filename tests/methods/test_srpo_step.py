"""One SRPO step on the random-weight tiny world: where gradients go, which sigmas the model sees, pass weights,
gradient checkpointing and the rollout against FluxPipeline."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    PROMPTS,
    build_parts,
    context,
    record_branches,
    run_step,
    tiny_config,
)

from directalign import flow
from directalign.engine.context import STREAM_NOISE
from directalign.methods.sampling import rollout

# the hinge at 5 is active for every sample of the random world (|r| <= 2.3): loss = share * (5 - r)
HINGE = "srpo.hinge_threshold=5.0"


def _setup(*overrides, finetune=True):
    cfg = tiny_config("srpo", HINGE, *overrides)
    adapter, reward, method, params = build_parts(cfg, finetune=finetune)
    return cfg, adapter, reward, method, params


def _draws(method, cfg, step, seed, n=1):
    """Replay the step's window draws: SRPO draws them, in order, from the context's own stream."""
    g = context(step, PROMPTS, seed).generator()
    return [flow.draw_window(method.grid, cfg.srpo.groundtruth_ratio, g, cfg.srpo.window_margin) for _ in range(n)]


# ------------------------------------------------------------------------------------------------------- (a)
def test_gradients_reach_only_lora_parameters(random_world, monkeypatch):
    cfg, adapter, reward, method, params = _setup()
    results = record_branches(monkeypatch, method)
    out = run_step(method)
    assert [r.name for r in results] == ["denoise", "inversion"]
    assert set(out.metrics) == {f"{b}_{k}" for b in ("denoise", "inversion") for k in ("reward", "sigma", "k")}

    lora = {n: p for n, p in adapter.transformer.named_parameters() if "lora_" in n}
    assert lora, "no LoRA parameters were added"
    assert {id(p) for p in lora.values()} == {id(p) for p in params}
    for n, p in lora.items():
        assert p.requires_grad, n
        assert p.grad is not None, f"{n} received no gradient"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().max() > 0, f"{n} has an all-zero gradient"

    base = [(n, p) for n, p in adapter.transformer.named_parameters() if "lora_" not in n]
    assert len(base) > 50
    for n, p in base:
        assert p.grad is None, f"transformer base weight {n} got a gradient"
        assert not p.requires_grad, n
    for label, module in (("vae", adapter.vae), ("text_encoder", adapter.pipe.text_encoder),
                          ("text_encoder_2", adapter.pipe.text_encoder_2), ("reward", reward)):
        named = list(module.named_parameters())
        assert named
        for n, p in named:
            assert p.grad is None, f"{label}.{n} got a gradient"


def test_full_finetune_grads_reach_transformer_only(random_world):
    cfg, adapter, reward, method, params = _setup("train.finetune=full")
    run_step(method)
    with_grad = [n for n, p in adapter.transformer.named_parameters() if p.grad is not None]
    assert len(with_grad) == len(list(adapter.transformer.parameters()))
    assert float(adapter.transformer.proj_out.weight.grad.abs().sum()) > 0
    for module in (adapter.vae, adapter.pipe.text_encoder, adapter.pipe.text_encoder_2, reward):
        assert all(p.grad is None for p in module.parameters())


# ------------------------------------------------------------------------------------------------------- (b)
class _Recorder:
    """Wrap the adapter's velocity to record each call's input, sigma and whether gradients were on."""

    def __init__(self, adapter):
        self.calls: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        self._orig = adapter.velocity

    def __call__(self, x, sigma, *args, **kwargs):
        self.calls.append((x.detach().clone(), sigma.detach().clone(), torch.is_grad_enabled()))
        return self._orig(x, sigma, *args, **kwargs)


@pytest.mark.parametrize("quantize", [0, 1000])
def test_branches_query_the_model_at_draw_window_sigmas(random_world, monkeypatch, quantize):
    cfg, adapter, reward, method, _ = _setup(f"srpo.quantize_timestep={quantize}")
    rec = _Recorder(adapter)
    monkeypatch.setattr(adapter, "velocity", rec)
    results = record_branches(monkeypatch, method)
    targets = []
    orig_da = flow.direct_align_x0

    def spy(x0, noise, sq, st, fn):
        targets.append((sq, st))
        return orig_da(x0, noise, sq, st, fn)

    monkeypatch.setattr(flow, "direct_align_x0", spy)

    step, seed = 4, 11
    out = run_step(method, step, PROMPTS, seed)

    # replay the context's streams: the global batch's noise (shared), then the window draw (the rank's own)
    (draw,) = _draws(method, cfg, step, seed)
    assert draw.denoise_query > draw.denoise_target
    assert draw.inversion_query < draw.inversion_target
    noise = adapter.noise(len(PROMPTS), cfg.model.height, cfg.model.width,
                          context(step, PROMPTS, seed).generator(STREAM_NOISE, shared=True))

    s = cfg.srpo
    assert len(rec.calls) == s.rollout_steps + 2
    # the rollout: no gradient, from the step's noise, along the shifted schedule
    torch.testing.assert_close(rec.calls[0][0], noise, rtol=0, atol=0)
    sched = flow.sigma_schedule(s.rollout_steps, cfg.sampling.shift)
    for i, (_, sig, grad_on) in enumerate(rec.calls[: s.rollout_steps]):
        assert not grad_on
        expected = flow.quantize_sigma(sched[i].float().expand(len(PROMPTS)), quantize)
        torch.testing.assert_close(sig, expected.to(sig.dtype), rtol=0, atol=1e-6)
    # the two Direct-Align passes: with gradient, at the draw's query sigmas, denoise first
    (_, sd, gd), (_, si, gi) = rec.calls[s.rollout_steps:]
    assert gd and gi
    q = lambda v: flow.quantize_sigma(torch.tensor([v, v], dtype=torch.float32), quantize)  # noqa: E731
    torch.testing.assert_close(sd, q(draw.denoise_query), rtol=0, atol=1e-6)
    torch.testing.assert_close(si, q(draw.inversion_query), rtol=0, atol=1e-6)
    assert targets == [(draw.denoise_query, draw.denoise_target), (draw.inversion_query, draw.inversion_target)]
    assert [(r.name, r.sigma_query, r.sigma_target) for r in results] == [
        ("denoise", draw.denoise_query, draw.denoise_target),
        ("inversion", draw.inversion_query, draw.inversion_target)]
    assert out.metrics["denoise_sigma"] == draw.denoise_query
    assert out.metrics["inversion_sigma"] == draw.inversion_query
    # the k each branch uses comes from its own ramp at its own grid position
    n = s.grid_points
    k_denoise = flow.linear_ramp(*s.discount_pos, n, draw.m)
    k_inversion = flow.linear_ramp(*s.discount_inv, n, draw.m_inversion)
    assert results[0].k == pytest.approx(k_denoise)
    assert results[1].k == pytest.approx(k_inversion)
    assert out.metrics["denoise_k"] == pytest.approx(k_denoise)
    assert out.metrics["inversion_k"] == pytest.approx(k_inversion)


def test_control_words_reach_reward_text_only(random_world, monkeypatch):
    cfg, adapter, reward, method, _ = _setup("reward.positive_words=[textured]", "reward.negative_words=[flat]")
    method.adapter._cache.clear()
    encoded, scored = [], []
    orig_enc, orig_score = adapter.encode_prompts, reward.score_texts
    monkeypatch.setattr(adapter, "encode_prompts", lambda p: (encoded.append(list(p)), orig_enc(p))[1])
    monkeypatch.setattr(reward, "score_texts", lambda st, t: (scored.append(list(t)), orig_score(st, t))[1])
    run_step(method)
    assert encoded and all(batch == PROMPTS for batch in encoded)
    flat = [t for batch in scored for t in batch]
    assert set(flat) == {f"textured. {p}" for p in PROMPTS} | {f"flat. {p}" for p in PROMPTS}


def test_branch_rewards_use_official_forms(random_world, monkeypatch):
    """Denoise scores (1 + k_pos) s(pos) - s(neg); inversion swaps the words: (1 + k_inv) s(neg) - s(pos)."""
    from directalign.methods import srpo as srpo_mod

    cfg, adapter, reward, method, _ = _setup("reward.positive_words=[textured, detailed]",
                                             "reward.negative_words=[flat]")
    results = record_branches(monkeypatch, method)
    calls = []
    orig = srpo_mod.semantic_relative_reward

    def spy(rw, images, prompts, form, k, pos, neg, swap=False):
        out = orig(rw, images, prompts, form, k, pos, neg, swap=swap)
        with torch.no_grad():
            state = rw.encode_images(images)
            sp = rw.score_texts(state, [f"{pos}. {p}" for p in prompts])
            sn = rw.score_texts(state, [f"{neg}. {p}" for p in prompts])
        calls.append(dict(form=form, k=k, pos=pos, neg=neg, swap=swap, out=out.detach(), sp=sp, sn=sn))
        return out

    monkeypatch.setattr(srpo_mod, "semantic_relative_reward", spy)
    out = run_step(method, 3)
    assert [c["swap"] for c in calls] == [False, True]
    # step 3, round robin: positive [textured, detailed][3 % 2], negative [flat][3 % 1]
    assert all((c["pos"], c["neg"], c["form"]) == ("detailed", "flat", "official") for c in calls)
    d, i = calls
    torch.testing.assert_close(d["out"], (1 + d["k"]) * d["sp"] - d["sn"])
    torch.testing.assert_close(i["out"], (1 + i["k"]) * i["sn"] - i["sp"])
    assert [r.k for r in results] == [d["k"], i["k"]]
    assert [out.metrics["denoise_k"], out.metrics["inversion_k"]] == [d["k"], i["k"]]
    assert results[0].reward == pytest.approx(float(d["out"].mean()), rel=1e-5)
    assert out.metrics["denoise_reward"] == pytest.approx(float(d["out"].mean()), rel=1e-5)
    assert out.metrics["inversion_reward"] == pytest.approx(float(i["out"].mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------------------- (c)
def test_samples_per_rollout_doubles_branches_and_shares_sum_to_one(random_world, monkeypatch):
    cfg, adapter, reward, method, _ = _setup("srpo.samples_per_rollout=2")
    results = record_branches(monkeypatch, method)
    step, seed = 1, 5
    losses = []

    def backward(loss):
        losses.append(loss.detach())
        loss.backward()

    out = run_step(method, step, PROMPTS, seed, backward=backward)
    assert [r.name for r in results] == ["denoise", "inversion", "denoise", "inversion"]
    assert len(losses) == 4
    # two independent window draws, in order, from the context's own stream
    draws = _draws(method, cfg, step, seed, n=2)
    assert [r.sigma_query for r in results] == [draws[0].denoise_query, draws[0].inversion_query,
                                                draws[1].denoise_query, draws[1].inversion_query]
    assert out.metrics["denoise_sigma"] == pytest.approx((draws[0].denoise_query + draws[1].denoise_query) / 2)
    assert out.metrics["inversion_sigma"] == pytest.approx(
        (draws[0].inversion_query + draws[1].inversion_query) / 2)
    # hinge at threshold 5 is active for every sample (|r| <= 2.3), so loss_i = share_i * (5 - mean r_i)
    shares = [r.loss / (cfg.srpo.hinge_threshold - r.reward) for r in results]
    for s in shares:
        assert s == pytest.approx(0.25, rel=1e-5)
    assert sum(shares) == pytest.approx(1.0, rel=1e-5)
    assert [float(x) for x in losses] == pytest.approx([r.loss for r in results])
    assert out.loss == pytest.approx(sum(r.loss for r in results))
    assert out.reward == pytest.approx(sum(r.reward for r in results) / 4)


def test_single_branch_gets_full_pass_weight(random_world, monkeypatch):
    cfg, adapter, reward, method, _ = _setup("srpo.inversion_branch=false")
    results = record_branches(monkeypatch, method)
    out = run_step(method)
    assert [r.name for r in results] == ["denoise"]
    assert set(out.metrics) == {"denoise_reward", "denoise_sigma", "denoise_k"}
    assert results[0].loss == pytest.approx(cfg.srpo.hinge_threshold - results[0].reward, rel=1e-5)
    assert out.loss == pytest.approx(cfg.srpo.hinge_threshold - out.reward, rel=1e-5)


# ------------------------------------------------------------------------------------------------------- (d)
def test_gradient_checkpointing_gives_equal_gradients(random_world):
    cfg, adapter, reward, method, params = _setup()
    names = [n for n, p in adapter.transformer.named_parameters() if p.requires_grad]

    def grads():
        for p in params:
            p.grad = None
        losses = []

        def backward(loss):
            losses.append(float(loss.detach()))
            loss.backward()

        run_step(method, 2, PROMPTS, 7, backward=backward)
        return [p.grad.clone() for p in params], losses

    g_off, l_off = grads()
    adapter.transformer.enable_gradient_checkpointing()
    assert adapter.transformer.gradient_checkpointing
    calls = []
    orig = adapter.transformer._gradient_checkpointing_func

    def counting(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    adapter.transformer._gradient_checkpointing_func = counting
    g_on, l_on = grads()
    assert calls, "gradient checkpointing was enabled but never used"
    assert len(l_on) == len(l_off) == 2
    assert l_on == pytest.approx(l_off, rel=1e-6, abs=1e-7)
    for n, a, b in zip(names, g_off, g_on):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=n)


# ------------------------------------------------------------------------------------------------------- (e)
@pytest.mark.parametrize("steps,guidance", [(3, 3.5), (5, 1.0)])
def test_rollout_matches_flux_pipeline(random_world, steps, guidance):
    cfg, adapter, reward, method, _ = _setup(finetune=False)
    h = w = cfg.model.height
    noise = adapter.noise(2, h, w, torch.Generator().manual_seed(0))
    ours = rollout(adapter, adapter.encode_prompts(PROMPTS), noise, steps, cfg.sampling.shift, guidance, h, w)
    pipe_out = adapter.pipe(prompt=PROMPTS, latents=noise.clone(), num_inference_steps=steps,
                            guidance_scale=guidance, height=h, width=w, output_type="latent",
                            max_sequence_length=adapter.max_sequence_length).images
    assert pipe_out.shape == ours.shape
    assert not torch.allclose(ours, noise, atol=1e-2)  # it did integrate something
    torch.testing.assert_close(ours, pipe_out, rtol=0, atol=1e-4)
