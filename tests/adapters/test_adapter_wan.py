"""The Wan 2.1 / 2.2 text-to-video adapter on tiny random-weight instances of the real diffusers classes.

The rollout equals ``WanPipeline``'s own sampler for the same noise and sigmas (guidance 1 and true CFG; Wan 2.2's
expert switch at ``boundary_ratio`` with ``guidance_scale_2``), a full SRPO step on video reaches the trainable
expert's LoRA only, the exported LoRA loads back into ``WanPipeline`` with the same output, rewards average over
frames, ``load_adapter`` loads a saved directory and names a missing component in one line, the shipped Wan configs
load, and the frame-consistency indicator matches its closed form.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import randomise_lora_b, record_branches, run_step, tiny_config

from directalign import flow, metrics
from directalign.adapters.loading import FAMILIES, load_adapter
from directalign.adapters.tiny_wan import WAN_BOUNDARY, tiny_wan_pipeline
from directalign.adapters.wan import WanAdapter, WanConfigError
from directalign.config import build_config, load_config, packaged_config
from directalign.engine.finetune import DTYPES, apply_finetune_mode
from directalign.errors import TrainingError, UserError
from directalign.methods.registry import METHODS
from directalign.methods.sampling import rollout
from directalign.rewards.base import Reward
from directalign.rewards.registry import load_reward
from directalign.rewards.relative import semantic_relative_reward

PROMPTS = ["a red circle on a blue background", "a green square"]
SIDE, FRAMES, SHIFT = 16, 5, 3.0
VERSIONS = {"2.1": False, "2.2": True}  # version -> two experts


def _adapter(version="2.1", seed=0, expert="high", guidance_2=None):
    pipe = tiny_wan_pipeline(seed, SHIFT, two_experts=VERSIONS[version])
    return WanAdapter(pipe, frames=FRAMES, trainable_expert=expert, guidance_2=guidance_2)


def _pipeline(adapter, noise, steps, guidance, output_type="latent", guidance_2=None):
    """``WanPipeline.__call__`` with its scheduler on the sigmas of our rollout (``set_timesteps(sigmas=...)``, as
    the SD3 and Qwen-Image tests pass them); the pipeline has no ``sigmas`` argument of its own."""
    pipe = adapter.pipe
    sigmas = np.linspace(1.0, 1 / steps, steps).tolist()
    orig = type(pipe.scheduler).set_timesteps
    pipe.scheduler.set_timesteps = lambda n, device=None: orig(pipe.scheduler, n, device=device, sigmas=sigmas)
    try:
        kwargs = {"height": SIDE, "width": SIDE, "num_frames": adapter.frames, "num_inference_steps": steps,
                  "latents": noise.clone(), "guidance_scale": guidance, "output_type": output_type,
                  "max_sequence_length": adapter.max_sequence_length}
        if guidance_2 is not None:
            kwargs["guidance_scale_2"] = guidance_2
        return pipe(PROMPTS, **kwargs).frames
    finally:
        del pipe.scheduler.set_timesteps


# ---------------------------------------------------------------------------------------------------- rollout
@pytest.mark.parametrize("version", list(VERSIONS))
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_rollout_matches_the_pipeline_sampler(version, guidance):
    g2 = 2.0 if version == "2.2" else None
    adapter = _adapter(version, guidance_2=g2)
    steps = 4
    noise = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0))
    assert noise.shape == (2, 4, 3, 8, 8)  # (B, C, T = (5 - 1) / 2 + 1, h, w)
    x0 = rollout(adapter, adapter.encode_prompts(PROMPTS), noise, steps, SHIFT, guidance, SIDE, SIDE)
    ref = _pipeline(adapter, noise, steps, guidance, guidance_2=g2)
    assert float(ref.abs().mean()) > 0.1
    torch.testing.assert_close(x0, ref, rtol=0, atol=2e-5)
    video = _pipeline(adapter, noise, steps, guidance, "pt", guidance_2=g2)
    ours = adapter.decode(x0, SIDE, SIDE)
    assert ours.shape == video.shape == (2, FRAMES, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, video, rtol=0, atol=2e-5)
    if version == "2.2":  # the schedule crosses the boundary, and the low-noise expert really served its part
        sig = flow.sigma_schedule(steps, SHIFT)[:-1]
        assert bool((sig >= WAN_BOUNDARY).any()) and bool((sig < WAN_BOUNDARY).any())
        adapter.pipe.transformer_2 = adapter.pipe.transformer
        one = rollout(adapter, adapter.encode_prompts(PROMPTS), noise, steps, SHIFT, guidance, SIDE, SIDE)
        assert (one - x0).abs().max() > 1e-3


def test_noise_matches_the_pipeline_prepare_latents():
    adapter = _adapter()
    ours = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(7))
    ref = adapter.pipe.prepare_latents(2, 4, SIDE, SIDE, FRAMES, torch.float32, torch.device("cpu"),
                                       torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_expert_switch_and_guidance_2_per_row():
    """Rows above the boundary go to ``transformer``, rows below to ``transformer_2`` with ``guidance_2``; a batch
    straddling the boundary equals its rows one by one."""
    adapter = _adapter("2.2", guidance_2=1.5)
    embeds = adapter.encode_prompts(PROMPTS)
    neg = adapter.encode_prompts([""] * 2)
    x = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(3))
    sigma = torch.tensor([WAN_BOUNDARY + 0.1, WAN_BOUNDARY - 0.1])
    assert adapter.expert_mask(sigma).tolist() == [True, False]
    assert adapter.expert_mask(torch.tensor([WAN_BOUNDARY])).tolist() == [True]  # t >= boundary: high noise
    with torch.no_grad():
        both = adapter.velocity(x, sigma, embeds, 3.0, SIDE, SIDE)
        for i, (model, g) in enumerate(((adapter.pipe.transformer, 3.0), (adapter.pipe.transformer_2, 1.5))):
            def run(tokens, i=i, model=model):
                return model(hidden_states=x[i : i + 1], timestep=sigma[i : i + 1] * 1000,
                             encoder_hidden_states=tokens, return_dict=False)[0]

            c, u = run(embeds.tokens[i : i + 1]), run(neg.tokens[i : i + 1])
            torch.testing.assert_close(both[i : i + 1], u + g * (c - u), rtol=0, atol=1e-6)


def test_frame_count_and_expert_errors_are_one_line():
    adapter = _adapter()
    with pytest.raises(WanConfigError, match=r"needs 2k \+ 1 frames; use e.g. 5") as e:
        adapter.set_frames(4)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    with pytest.raises(WanConfigError, match="set model.trainable_expert=high"):
        adapter.set_trainable_expert("low")
    with pytest.raises(WanConfigError, match="set model.guidance_2=0"):
        adapter.set_guidance_2(3.0)


# ----------------------------------------------------------------------------------------------- reward on video
class _MeanColour(Reward):
    """A closed-form text-conditioned reward: ``s(img, text) = mean(img[channel])``, the channel picked by the
    number of words in the text (mod 3)."""

    def encode_images(self, images):
        return images.mean(dim=(2, 3))  # (N, 3)

    def score_texts(self, state, texts):
        idx = torch.tensor([len(t.split()) % 3 for t in texts])
        return state[torch.arange(len(texts)), idx]


def test_video_reward_is_the_frame_mean_of_every_form():
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(2, 3, 3, 4, 4, generator=g, requires_grad=True)
    prompts = ["one", "one two"]
    reward = _MeanColour()
    pos, neg = "good", "bad day"  # control words change the word count, hence the channel
    for form, k in (("absolute", 0.0), ("official", 0.3), ("paper", 0.3), ("relative", 0.0)):
        got = semantic_relative_reward(reward, videos, prompts, form, k, pos, neg)
        per_frame = torch.stack([semantic_relative_reward(reward, videos[:, f], prompts, form, k, pos, neg)
                                 for f in range(3)], dim=1)
        torch.testing.assert_close(got, per_frame.mean(1))
    # closed form of the absolute form: "one" -> channel 1, "one two" -> channel 2, mean over frames and pixels
    want = torch.stack([videos[0, :, 1].mean(), videos[1, :, 2].mean()])
    got = semantic_relative_reward(reward, videos, prompts, "absolute")
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert videos.grad is not None and float(videos.grad[0, :, 1].sum()) == pytest.approx(1.0)


def test_frame_difference_closed_form():
    still = torch.full((1, 4, 3, 5, 5), 0.3)
    flicker = torch.zeros(1, 3, 3, 2, 2)
    flicker[:, 1] = 1.0  # black, white, black: every pair differs by 1 everywhere
    ramp = torch.linspace(0, 0.6, 4).view(1, 4, 1, 1, 1).expand(1, 4, 3, 2, 2)  # +0.2 per frame
    got = metrics.frame_difference(torch.cat([still[:, :3, :, :2, :2], flicker, ramp[:, :3]]))
    torch.testing.assert_close(got, torch.tensor([0.0, 1.0, 0.2]))
    assert metrics.frame_difference(torch.rand(2, 1, 3, 4, 4)).tolist() == [0.0, 0.0]
    assert metrics.drift_warnings({"frame_difference": 0.1}, {"frame_difference": 0.2})  # +100%: flicker
    assert not metrics.drift_warnings({"frame_difference": 0.1}, {"frame_difference": 0.12})
    with pytest.raises(ValueError, match=r"\(N, F, 3, H, W\)"):
        metrics.frame_difference(torch.rand(2, 3, 4, 4))


# ----------------------------------------------------------------------------------------- SRPO step and LoRA
def _cfg(extra=()):
    return tiny_config("srpo", "model.family=wan", f"model.height={SIDE}", f"model.width={SIDE}",
                       f"model.frames={FRAMES}", "srpo.hinge_threshold=5.0", "srpo.quantize_timestep=0",
                       f"sampling.shift={SHIFT}", "train.batch_size=2", *extra)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.state_dict().items()}


def _identical(module, snap):
    state = module.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[n], snap[n]) for n in snap)


# (version, trainable expert, SRPO window): the window's sigmas lie on the trainable expert's side of the boundary
STEP_CASES = [("2.1", "high", [5, 25]), ("2.2", "high", [5, 25]), ("2.2", "low", [35, 45])]


@pytest.mark.parametrize("version,expert,window", STEP_CASES)
def test_srpo_step_on_video_trains_the_chosen_experts_lora_only(version, expert, window, random_world, monkeypatch):
    cfg = _cfg([f"srpo.window={window}", f"model.trainable_expert={expert}"])
    adapter = _adapter(version, expert=expert)
    sigmas = flow.training_sigma_grid(cfg.srpo.schedule_steps, SHIFT, *window, cfg.srpo.grid_points)
    assert bool(adapter.expert_mask(sigmas).all()) == (expert == "high")
    assert bool(adapter.expert_mask(sigmas).any()) == (expert == "high")
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, torch.device("cpu"), spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)
    torch.manual_seed(0)
    params = apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)
    trained = adapter.transformer
    assert trained is (adapter.pipe.transformer_2 if expert == "low" else adapter.pipe.transformer)
    frozen = [adapter.vae, adapter.pipe.text_encoder, reward] + ([adapter.frozen_expert] if version == "2.2" else [])
    snaps = [_snapshot(m) for m in frozen]
    base = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_" not in n}
    lora_before = {n: p.detach().clone() for n, p in trained.named_parameters() if "lora_" in n}
    decoded = []
    decode = adapter.decode
    monkeypatch.setattr(adapter, "decode", lambda *a: decoded.append(decode(*a)) or decoded[-1])
    results = record_branches(monkeypatch, method)
    out = run_step(method, 0, PROMPTS, 3)
    assert [r.name for r in results] == ["denoise", "inversion"] and np.isfinite(out.loss)
    assert decoded and all(v.shape == (2, FRAMES, 3, SIDE, SIDE) for v in decoded)  # the reward saw videos
    lora = {n: p for n, p in trained.named_parameters() if "lora_" in n}
    assert lora and {id(p) for p in lora.values()} == {id(p) for p in params}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora.values())
    assert sum(float(p.grad.abs().sum()) for p in lora.values()) > 0
    for m in frozen:
        assert all(p.grad is None for p in m.parameters())
    torch.optim.SGD(params, lr=1.0).step()
    assert any(not torch.equal(p, lora_before[n]) for n, p in lora.items())
    assert all(torch.equal(p, base[n]) for n, p in trained.named_parameters() if "lora_" not in n)
    for m, snap in zip(frozen, snaps):
        assert _identical(m, snap)


@pytest.mark.parametrize("method", ["direct-align", "refl", "draft-k", "draft-lv", "alignprop", "grpo"])
def test_baselines_train_on_video_unchanged(method, random_world):
    """Every baseline's step runs on Wan 2.2 videos through the same reward seam and reaches the LoRA."""
    cfg = tiny_config(method, "model.family=wan", f"model.height={SIDE}", f"model.width={SIDE}",
                      f"model.frames={FRAMES}")
    adapter = _adapter("2.2")
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, torch.device("cpu"), spec.held_out_form(cfg)[0])
    m = spec.build(cfg, adapter, reward)
    torch.manual_seed(0)
    params = apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)
    vae = _snapshot(adapter.vae)
    out = run_step(m, 0, PROMPTS, 3)
    assert np.isfinite(out.loss) and all(np.isfinite(v) for v in out.metrics.values())
    assert sum(float(p.grad.abs().sum()) for p in params if p.grad is not None) > 0
    assert all(p.grad is None for p in adapter.frozen_expert.parameters()) and _identical(adapter.vae, vae)


@pytest.mark.parametrize("version,expert", [("2.1", "high"), ("2.2", "low")])
def test_exported_lora_loads_back_into_wan_pipeline(version, expert, tmp_path):
    from directalign.export import export_weights

    cfg = _cfg([f"model.trainable_expert={expert}"])
    adapter = _adapter(version, expert=expert)
    apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)
    adapter.transformer.eval()
    paths = export_weights(cfg, adapter, tmp_path / "export")
    noise = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0))
    ours = rollout(adapter, adapter.encode_prompts(PROMPTS), noise, 4, SHIFT, 1.0, SIDE, SIDE)
    fresh = _adapter(version)
    base = _pipeline(fresh, noise, 4, 1.0)
    assert (ours - base).abs().max() > 1e-4  # the LoRA changes the output
    assert adapter.lora_load_kwargs == ({"load_into_transformer_2": True} if expert == "low" else {})
    fresh.pipe.load_lora_weights(str(paths["lora"]), **adapter.lora_load_kwargs)
    torch.testing.assert_close(_pipeline(fresh, noise, 4, 1.0), ours, rtol=1e-5, atol=1e-5)
    merged = type(adapter.transformer).from_pretrained(str(paths["transformer"]))
    fused = _adapter(version)
    setattr(fused.pipe, "transformer_2" if expert == "low" else "transformer", merged)
    torch.testing.assert_close(_pipeline(fused, noise, 4, 1.0), ours, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan")
    out = {}
    for version, two in VERSIONS.items():
        tiny_wan_pipeline(0, SHIFT, two_experts=two).save_pretrained(root / version)
        out[version] = root / version
    return out


@pytest.mark.parametrize("version", list(VERSIONS))
def test_load_adapter_loads_a_saved_directory(version, saved_dirs):
    expert = "low" if version == "2.2" else "high"
    cfg = build_config({}, ["model.family=wan", f"model.path={saved_dirs[version]}", "model.device=cpu",
                            f"model.height={SIDE}", f"model.width={SIDE}", f"model.frames={FRAMES}",
                            f"model.trainable_expert={expert}", f"model.guidance_2={2.0 if version == '2.2' else 0}"])
    adapter = load_adapter(cfg.model, torch.device("cpu"), DTYPES[cfg.model.dtype])
    assert isinstance(adapter, WanAdapter) and adapter.frames == FRAMES and adapter.trainable_expert == expert
    assert adapter.two_experts == (version == "2.2") and adapter.guidance_2 == (2.0 if version == "2.2" else None)
    ref = _adapter(version)
    noise = ref.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0))
    a = rollout(adapter, adapter.encode_prompts(PROMPTS), noise, 3, SHIFT, 1.0, SIDE, SIDE)
    b = rollout(ref, ref.encode_prompts(PROMPTS), noise, 3, SHIFT, 1.0, SIDE, SIDE)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("component", ["vae", "text_encoder", "tokenizer", "transformer"])
def test_load_adapter_names_a_missing_component(component, saved_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_dirs["2.2"], broken)
    shutil.rmtree(broken / component)
    cfg = build_config({}, ["model.family=wan", f"model.path={broken}", "model.device=cpu"])
    with pytest.raises(TrainingError) as e:
        load_adapter(cfg.model, torch.device("cpu"), torch.float32)
    msg = str(e.value)
    assert "\n" not in msg and component in msg and FAMILIES["wan"].pipeline in msg


def test_load_adapter_refuses_a_frame_count_the_vae_cannot_make(saved_dirs):
    cfg = build_config({}, ["model.family=wan", f"model.path={saved_dirs['2.1']}", "model.device=cpu",
                            "model.frames=4"])
    with pytest.raises(UserError, match="model.frames=4") as e:
        load_adapter(cfg.model, torch.device("cpu"), torch.float32)
    assert "\n" not in str(e.value)


def test_resolution_multiple_from_the_vae_config(saved_dirs):
    from directalign.adapters.loading import vae_config

    assert FAMILIES["wan"].resolution_multiple(vae_config(saved_dirs["2.1"])) == _adapter().resolution_multiple == 4
    assert FAMILIES["wan"].resolution_multiple() == 16  # the published VAE: 8x spatial, 2x2 patches


# ---------------------------------------------------------------------------------------------------- configs
def test_wan22_config_has_the_published_settings():
    cfg = load_config(packaged_config("wan22-srpo-hpsv2"))
    m = cfg.model
    assert (cfg.method, m.family, cfg.reward.kind) == ("srpo", "wan", "hpsv2")
    assert m.path == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert (m.height, m.width, m.frames, m.trainable_expert, m.guidance_2) == (720, 1280, 81, "high", 3.0)
    assert (m.frames - 1) % 4 == 0 and m.height % 16 == 0 and m.width % 16 == 0
    assert (cfg.sampling.shift, cfg.srpo.rollout_guidance, cfg.eval.guidance) == (12.0, 4.0, 4.0)
    assert (cfg.srpo.rollout_steps, cfg.srpo.train_guidance, cfg.train.finetune) == (40, 1.0, "lora")
    assert cfg.eval.steps == 40
    # the SRPO window trains where the high-noise expert serves: sigma >= boundary_ratio (0.875)
    grid = flow.training_sigma_grid(cfg.srpo.schedule_steps, cfg.sampling.shift, *cfg.srpo.window,
                                    cfg.srpo.grid_points)
    assert float(grid.min()) >= 0.875 and float(grid.max()) == pytest.approx(0.962, abs=1e-3)


def test_wan21_config_has_the_published_settings():
    cfg = load_config(packaged_config("wan21-srpo-hpsv2"))
    m = cfg.model
    assert (m.family, m.path, m.height, m.width, m.frames) == ("wan", "Wan-AI/Wan2.1-T2V-14B-Diffusers", 720, 1280,
                                                                81)
    assert (cfg.sampling.shift, cfg.srpo.rollout_guidance, cfg.eval.steps) == (5.0, 5.0, 50)
    grid = flow.training_sigma_grid(50, 5.0, *cfg.srpo.window, cfg.srpo.grid_points)
    assert float(grid.max()) == pytest.approx(0.963, abs=1e-3) and float(grid.min()) == pytest.approx(0.754, abs=1e-3)


# ------------------------------------------------------------------------------------------- eval, report, train
def test_grid_draws_each_video_as_a_frame_strip():
    from directalign.report_images import to_grid

    videos = torch.rand(2, 3, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    grid = torch.from_numpy(np.array(to_grid(videos, ncol=2, pad=2, upscale=1))).float() / 255
    assert tuple(grid.shape) == (4 + 4, 2 * (3 * 5 + 2) + 2, 3)  # one row of two strips of three 5-px frames
    for i in range(2):
        for f in range(3):
            x = 2 + i * (15 + 2) + f * 5
            tile = grid[2:6, x : x + 5].permute(2, 0, 1)
            torch.testing.assert_close(tile, videos[i, f], rtol=0, atol=0.5 / 255 + 1e-6)


def _unstrip(strips: torch.Tensor, frames: int) -> torch.Tensor:
    return torch.stack(strips.chunk(frames, dim=-1), dim=1)


def test_eval_scores_videos_per_frame_and_reports_frame_difference(saved_dirs, random_world):
    from directalign.eval.evaluate import evaluate_model, indicator_means
    from directalign.eval.models import resolve_model
    from directalign.eval.scoring import RewardSpec, score_images

    cfg = tiny_config("srpo", "model.family=wan", f"model.path={saved_dirs['2.1']}", "model.device=cpu",
                      f"model.height={SIDE}", f"model.width={SIDE}", f"model.frames={FRAMES}", "eval.seeds=[0,1]")
    reward = load_reward(cfg.reward, torch.device("cpu"), "absolute")
    spec = RewardSpec("tiny", reward, "textured", "flat")
    res = evaluate_model(resolve_model(str(saved_dirs["2.1"]), cfg), cfg, True, [spec], log=lambda *_: None)
    n = len(res.per_image)
    assert res.images.shape == (n, 3, SIDE, FRAMES * SIDE)  # frame strips
    videos = _unstrip(res.images, FRAMES)
    got = torch.tensor([r["frame_difference"] for r in res.per_image])
    torch.testing.assert_close(got, metrics.frame_difference(videos), rtol=0, atol=1e-6)
    assert float(got.min()) > 0
    prompts = [r["prompt"] for r in res.per_image]
    per_frame = torch.stack([score_images(spec, videos[:, f], prompts)["score"] for f in range(FRAMES)], dim=1)
    torch.testing.assert_close(torch.tensor([r["tiny.score"] for r in res.per_image]), per_frame.mean(1),
                               rtol=1e-4, atol=1e-5)
    means = indicator_means(res.aggregate)
    assert means["frame_difference"] == pytest.approx(float(got.mean()), rel=1e-5)
    assert np.isfinite(res.aggregate["reward"])


def test_two_training_steps_end_to_end_on_video(saved_dirs, random_world, tmp_path):
    """train() on a saved tiny Wan 2.2: rollout with the expert switch and CFG, SRPO steps on video, held-out
    evaluation before and after, periodic samples, LoRA export and a report showing frame strips."""
    import json

    from PIL import Image

    from directalign.training import train

    cfg = tiny_config("srpo", "model.family=wan", f"model.path={saved_dirs['2.2']}", "model.device=cpu",
                      f"model.height={SIDE}", f"model.width={SIDE}", f"model.frames={FRAMES}", "model.guidance_2=2.0",
                      f"sampling.shift={SHIFT}", "train.steps=2", "srpo.rollout_guidance=3.0", "eval.before=true",
                      "run.report=true", "run.sample_every=2", run_dir=tmp_path / "run")
    result = train(cfg, log=lambda *_: None)
    run = result.run_dir
    summary = json.loads((run / "summary.json").read_text())
    assert np.isfinite(summary["reward_before"]) and np.isfinite(summary["reward_after"])
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert any((run / "export").rglob("pytorch_lora_weights.safetensors"))
    assert isinstance(result.adapter, WanAdapter) and result.adapter.two_experts
    n = 24  # the tiny world's held-out prompts x one seed, 4 prompts per row
    w, h = Image.open(run / "samples" / "after.png").size
    assert (w, h) == ((4 * (FRAMES * SIDE + 2) + 2) * 3, ((n + 3) // 4 * (SIDE + 2) + 2) * 3)
    report = (run / "report.html").read_text()
    assert "saturation" in report and "samples are missing" not in report  # the strips were cut and measured


# --------------------------------------------------------------------------------- checkpointing, FSDP, LoRA targets
def _step_grads(extra, random_world):
    cfg = _cfg(extra)
    adapter = _adapter("2.2")
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, torch.device("cpu"), spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)
    torch.manual_seed(0)
    apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)
    run_step(method, 1, PROMPTS, 9)
    return adapter, {n: p.grad.clone() for n, p in adapter.transformer.named_parameters() if p.grad is not None}


def test_gradient_and_vae_checkpointing_give_the_same_gradients(random_world):
    _, plain = _step_grads(["srpo.rollout_guidance=2.0"], random_world)
    adapter, ckpt = _step_grads(["srpo.rollout_guidance=2.0", "train.gradient_checkpointing=true",
                                 "train.vae_checkpointing=true"], random_world)
    assert adapter.transformer.gradient_checkpointing and adapter.decode_checkpointing
    assert plain.keys() == ckpt.keys() and plain
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-7, msg=n)


def test_fsdp_block_names_and_lora_targets_cover_the_transformer():
    adapter = _adapter("2.2")
    t = adapter.transformer
    blocks = [b for name in adapter.fsdp_block_names for b in getattr(t, name)]
    assert len(blocks) == t.config.num_layers and all(type(b).__name__ == "WanTransformerBlock" for b in blocks)
    names = [n for n, _ in t.named_modules()]
    for target in adapter.lora_target_modules:
        assert sum(n.endswith("." + target) for n in names) >= t.config.num_layers, target


@pytest.mark.parametrize("expert", ["high", "low"])
def test_eval_puts_a_runs_lora_and_transformer_into_the_trained_expert(expert, tmp_path):
    """``directalign eval`` of a Wan 2.2 run: the exported LoRA and the merged transformer land in the expert that
    trained (the low-noise one lives in ``transformer_2``), so eval reproduces the run's own sampler."""
    from directalign.eval.models import apply_lora, apply_transformer
    from directalign.export import export_weights

    cfg = _cfg([f"model.trainable_expert={expert}"])
    adapter = _adapter("2.2", expert=expert)
    apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)
    adapter.transformer.eval()
    paths = export_weights(cfg, adapter, tmp_path / "export")
    noise = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0))
    ours = rollout(adapter, adapter.encode_prompts(PROMPTS), noise, 4, SHIFT, 1.0, SIDE, SIDE)
    for apply, arg in ((apply_lora, (paths["lora"], cfg)), (apply_transformer, (paths["transformer"],))):
        fresh = _adapter("2.2", expert=expert)
        untouched = {n: p.detach().clone() for n, p in fresh.frozen_expert.named_parameters()}
        apply(fresh, *arg)
        got = rollout(fresh, fresh.encode_prompts(PROMPTS), noise, 4, SHIFT, 1.0, SIDE, SIDE)
        torch.testing.assert_close(got, ours, rtol=1e-4, atol=1e-4)
        assert {n: p for n, p in fresh.frozen_expert.named_parameters()}.keys() == untouched.keys()
        for n, p in fresh.frozen_expert.named_parameters():
            assert torch.equal(p, untouched[n]), (apply.__name__, n)
