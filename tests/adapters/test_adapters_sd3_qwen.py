"""The SD3 / SD3.5 and Qwen-Image adapters on tiny random-weight instances of the real diffusers classes.

For each family: the rollout equals the pipeline's own sampler from the same latents (guidance 1 and true CFG),
a full SRPO step runs with gradients on the LoRA parameters only, LoRA injection covers every default target,
the exported LoRA reloads into a fresh pipeline with the same outputs, gradient checkpointing gives the same
gradients, and ``load_adapter`` loads a saved directory and names a missing component in one line.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import randomise_lora_b, record_branches, run_step, tiny_config

from directalign import flow
from directalign.adapters.loading import FAMILIES, load_adapter
from directalign.adapters.qwen_image import QwenImageAdapter
from directalign.adapters.sd3 import SD3Adapter
from directalign.adapters.tiny import tiny_qwen_image_pipeline, tiny_sd3_pipeline
from directalign.config import build_config
from directalign.engine.finetune import DTYPES, apply_finetune_mode
from directalign.errors import TrainingError
from directalign.methods.registry import METHODS
from directalign.methods.sampling import rollout
from directalign.rewards.registry import load_reward

PROMPTS = ["a red circle on a blue background", "a green square"]

# family -> (pipeline builder, adapter class, image side, max_sequence_length)
SPECS = {
    "sd3": (tiny_sd3_pipeline, SD3Adapter, 32, 16),
    "qwen-image": (tiny_qwen_image_pipeline, QwenImageAdapter, 16, 64),
}
FAMILY_NAMES = list(SPECS)


def _adapter(family: str, seed: int = 0):
    build, cls, side, seq = SPECS[family]
    return cls(build(seed), max_sequence_length=seq), side


def _cfg(family: str, side: int, extra=()):
    """The tiny SRPO config on a tiny pipeline of ``family`` (the model itself comes from :func:`_adapter`)."""
    return tiny_config("srpo", f"model.family={family}", f"model.height={side}", f"model.width={side}",
                       "srpo.hinge_threshold=5.0", "srpo.quantize_timestep=0", *extra)


def _load(cfg):
    """``load_adapter`` of ``cfg.model`` on the CPU."""
    return load_adapter(cfg.model, torch.device("cpu"), DTYPES[cfg.model.dtype])


def _pipeline_latents(adapter, family, noise, steps, guidance, side, output_type="latent"):
    sigmas = np.linspace(1.0, 1 / steps, steps).tolist()
    kwargs = dict(height=side, width=side, num_inference_steps=steps, sigmas=sigmas, latents=noise.clone(),
                  output_type=output_type, max_sequence_length=adapter.max_sequence_length)
    if family == "sd3":
        kwargs["guidance_scale"] = guidance
    else:
        kwargs["true_cfg_scale"] = guidance
        kwargs["negative_prompt"] = adapter.negative_prompt if guidance > 1 else None
    return adapter.pipe(PROMPTS, **kwargs).images


# ---------------------------------------------------------------------------------------------------- rollout
@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_rollout_matches_the_pipeline_sampler(family, guidance):
    adapter, side = _adapter(family)
    steps = 3
    shift = adapter.pipe.scheduler.config.shift
    noise = adapter.noise(2, side, side, torch.Generator().manual_seed(0))
    x0 = rollout(adapter, adapter.encode_prompts(PROMPTS), noise, steps, shift, guidance, side, side)
    ref = _pipeline_latents(adapter, family, noise, steps, guidance, side)
    assert x0.shape == ref.shape == noise.shape
    assert float(ref.abs().mean()) > 0.1
    torch.testing.assert_close(x0, ref, rtol=0, atol=2e-5)
    images = _pipeline_latents(adapter, family, noise, steps, guidance, side, output_type="pt")
    ours = adapter.decode(x0, side, side)
    assert ours.shape == (2, 3, side, side)
    torch.testing.assert_close(ours, images, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_noise_matches_the_pipeline_prepare_latents(family):
    adapter, side = _adapter(family)
    ours = adapter.noise(2, side, side, torch.Generator().manual_seed(7))
    kwargs = dict(height=side, width=side, dtype=torch.float32, device=torch.device("cpu"),
                  generator=torch.Generator().manual_seed(7))
    c = adapter.transformer.config.in_channels // (1 if family == "sd3" else 4)
    ref = adapter.pipe.prepare_latents(2, c, **kwargs)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_encode_decode_round_trip_shapes_and_latent_normalisation(family):
    adapter, side = _adapter(family)
    images = torch.rand(2, 3, side, side)
    x = adapter.encode_images(images)
    assert x.shape == adapter.noise(2, side, side, torch.Generator().manual_seed(0)).shape
    out = adapter.decode(x, side, side)
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_qwen_batches_of_different_prompt_lengths_match_single_prompts():
    adapter, side = _adapter("qwen-image")
    prompts = ["a red circle on a blue background with a plain texture", "a square"]
    batch = adapter.encode_prompts(prompts)
    assert batch.tokens.shape[0] == 2 and batch.mask.sum(1).tolist()[0] > batch.mask.sum(1).tolist()[1]
    assert batch.mask[1, -1] == 0  # the short prompt is padded
    x = adapter.noise(2, side, side, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        both = adapter.velocity(x, sigma, batch, 1.0, side, side)
        for i, p in enumerate(prompts):
            one = adapter.velocity(x[i : i + 1], sigma[:1], adapter.encode_prompts([p]), 1.0, side, side)
            torch.testing.assert_close(both[i : i + 1], one, rtol=0, atol=2e-5)


def test_qwen_precomputed_prompt_embeddings_skip_the_text_encoder():
    adapter, side = _adapter("qwen-image")
    ref = adapter.encode_prompts(PROMPTS)
    other, _ = _adapter("qwen-image")
    other.pipe.text_encoder = None
    with pytest.raises(RuntimeError, match="set_prompt_embeds"):
        other.encode_prompts(PROMPTS)
    other.set_prompt_embeds({p: ref[i : i + 1].tokens[:, : int(ref.mask[i].sum())] for i, p in enumerate(PROMPTS)})
    got = other.encode_prompts(PROMPTS)
    torch.testing.assert_close(got.tokens, ref.tokens)
    assert torch.equal(got.mask, ref.mask)


# ----------------------------------------------------------------------------------------- SRPO step and LoRA
def _setup(family, random_world, extra=(), finetune=True):
    adapter, side = _adapter(family)
    cfg = _cfg(family, side, extra)
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, torch.device("cpu"), spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)  # before fine-tuning, as training builds it
    params = None
    if finetune:
        torch.manual_seed(0)
        params = apply_finetune_mode(cfg.train, adapter)
        if cfg.train.finetune == "lora":
            randomise_lora_b(adapter.transformer)
    return cfg, adapter, reward, method, params


def _text_encoders(adapter):
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [getattr(adapter.pipe, n) for n in names if getattr(adapter.pipe, n, None) is not None]


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("train_guidance", [1.0, 2.5])
def test_srpo_step_gradients_reach_only_lora_parameters(family, train_guidance, random_world, monkeypatch):
    cfg, adapter, reward, method, params = _setup(family, random_world, [f"srpo.train_guidance={train_guidance}"])
    results = record_branches(monkeypatch, method)
    out = run_step(method, 0, PROMPTS, 3)
    assert [r.name for r in results] == ["denoise", "inversion"]
    assert all(np.isfinite(r.loss) for r in results)
    assert np.isfinite(out.loss) and all(np.isfinite(v) for v in out.metrics.values())
    lora = {n: p for n, p in adapter.transformer.named_parameters() if "lora_" in n}
    assert lora and {id(p) for p in lora.values()} == {id(p) for p in params}
    last = f"transformer_blocks.{len(adapter.transformer.transformer_blocks) - 1}."
    for n, p in lora.items():
        # the last block's text-stream outputs are discarded by the model, so those layers get no signal
        dead_end = n.startswith(last) and any(k in n for k in ("add_q_proj", "to_add_out", "txt_mlp", "ff_context"))
        if dead_end:
            assert p.grad is None or p.grad.abs().max() == 0, n
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
    for n, p in adapter.transformer.named_parameters():
        if "lora_" not in n:
            assert p.grad is None and not p.requires_grad, n
    for module in (adapter.vae, reward, *_text_encoders(adapter)):
        assert all(p.grad is None for p in module.parameters())


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_direct_align_step_recovers_x0_with_the_adapter_velocity(family):
    """The Direct-Align recovery through this adapter equals the closed form of paper Eq. 5 with its velocity."""
    adapter, side = _adapter(family)
    embeds = adapter.encode_prompts(PROMPTS)
    x0 = adapter.noise(2, side, side, torch.Generator().manual_seed(4))
    eps = adapter.noise(2, side, side, torch.Generator().manual_seed(5))
    sq, st = 0.8, 0.77

    def velocity(x, s):
        return adapter.velocity(x, s, embeds, 1.0, side, side)

    got = flow.direct_align_x0(x0, eps, sq, st, velocity)
    xq = sq * eps + (1 - sq) * x0
    with torch.no_grad():
        v = velocity(xq, torch.full((2,), sq))
    expected = (xq + (st - sq) * v - st * eps) / (1 - st)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_injection_covers_every_default_target(family):
    adapter, side = _adapter(family)
    cfg = _cfg(family, side)
    names = [n for n, _ in adapter.transformer.named_modules()]
    for target in adapter.lora_target_modules:
        assert any(n == target or n.endswith("." + target) for n in names), f"{target} is not in the transformer"
    x = adapter.noise(1, side, side, torch.Generator().manual_seed(0))
    embeds = adapter.encode_prompts(PROMPTS[:1])
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        before = adapter.velocity(x, sigma, embeds, 1.0, side, side)
    params = apply_finetune_mode(cfg.train, adapter)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in adapter.transformer.named_parameters() if ".lora_A" in n}
    for target in adapter.lora_target_modules:
        assert any(w.endswith(target) for w in wrapped), f"no LoRA on {target}"
    assert all("lora_" in n for n, p in adapter.transformer.named_parameters() if p.requires_grad)
    assert len(params) == 2 * len(wrapped)
    with torch.no_grad():  # lora_B starts at zero: the model is unchanged
        after = adapter.velocity(x, sigma, embeds, 1.0, side, side)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_exported_lora_reloads_into_a_fresh_pipeline(family, tmp_path):
    from directalign.export import export_weights

    adapter, side = _adapter(family)
    cfg = _cfg(family, side)
    apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)
    adapter.transformer.eval()
    paths = export_weights(cfg, adapter, tmp_path / "export")
    x = adapter.noise(1, side, side, torch.Generator().manual_seed(0))
    embeds = adapter.encode_prompts(PROMPTS[:1])
    sigma = torch.tensor([0.6])
    with torch.no_grad():
        trained = adapter.velocity(x, sigma, embeds, 1.0, side, side)
    fresh, _ = _adapter(family)
    with torch.no_grad():
        base = fresh.velocity(x, sigma, embeds, 1.0, side, side)
    assert (trained - base).abs().max() > 1e-4
    fresh.pipe.load_lora_weights(str(paths["lora"]))
    with torch.no_grad():
        reloaded = fresh.velocity(x, sigma, embeds, 1.0, side, side)
    torch.testing.assert_close(reloaded, trained, rtol=1e-5, atol=1e-5)
    merged = type(adapter.transformer).from_pretrained(str(paths["transformer"]))
    fresh2, _ = _adapter(family)
    fresh2.pipe.transformer = merged
    with torch.no_grad():
        fused = fresh2.velocity(x, sigma, embeds, 1.0, side, side)
    torch.testing.assert_close(fused, trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(family, random_world):
    grads = []
    for checkpointing in (False, True):
        cfg, adapter, reward, method, params = _setup(
            family, random_world, [f"train.gradient_checkpointing={str(checkpointing).lower()}",
                                   "srpo.train_guidance=2.0"])
        assert adapter.transformer.gradient_checkpointing is checkpointing
        run_step(method, 1, PROMPTS, 9)
        grads.append({n: p.grad.clone() for n, p in adapter.transformer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


# ---------------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    out = {}
    for family, (build, _, _, _) in SPECS.items():
        build(0).save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_load_adapter_loads_a_saved_directory(family, saved_dirs):
    _, cls, side, seq = SPECS[family]
    cfg = build_config({}, [f"model.family={family}", f"model.path={saved_dirs[family]}", "model.device=cpu",
                            f"model.height={side}", f"model.width={side}", f"model.max_sequence_length={seq}"])
    adapter = _load(cfg)
    assert isinstance(adapter, cls) and adapter.family == family
    ref, _ = _adapter(family)
    x = ref.noise(1, side, side, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = adapter.velocity(x, torch.tensor([0.5]), adapter.encode_prompts(PROMPTS[:1]), 1.0, side, side)
        b = ref.velocity(x, torch.tensor([0.5]), ref.encode_prompts(PROMPTS[:1]), 1.0, side, side)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,component", [("sd3", "text_encoder_3"), ("sd3", "tokenizer_2"),
                                              ("qwen-image", "vae"), ("qwen-image", "text_encoder")])
def test_load_adapter_names_a_missing_component(family, component, saved_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_dirs[family], broken)
    shutil.rmtree(broken / component)
    cfg = build_config({}, [f"model.family={family}", f"model.path={broken}", "model.device=cpu"])
    with pytest.raises(TrainingError) as e:
        _load(cfg)
    msg = str(e.value)
    assert "\n" not in msg and component in msg and FAMILIES[family].pipeline in msg


def test_load_adapter_names_missing_weights(saved_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_dirs["sd3"], broken)
    for f in (broken / "transformer").glob("*.safetensors"):
        f.unlink()
    cfg = build_config({}, ["model.family=sd3", f"model.path={broken}", "model.device=cpu"])
    with pytest.raises(TrainingError, match=r"transformer \(no config.json or weights\)"):
        _load(cfg)


@pytest.mark.parametrize("family,actual", [("flux", "sd3"), ("sd3", "qwen-image"), ("qwen-image", "sd3")])
def test_load_adapter_names_the_family_a_directory_holds(family, actual, saved_dirs):
    cfg = build_config({}, [f"model.family={family}", f"model.path={saved_dirs[actual]}", "model.device=cpu"])
    with pytest.raises(TrainingError, match=f"set model.family={actual}"):
        _load(cfg)


def test_tiny_world_is_flux_only():
    cfg = build_config({}, ["model.family=sd3"])
    with pytest.raises(TrainingError, match="FLUX-family"):
        _load(cfg)


def test_unknown_family_is_a_config_error():
    from directalign.engine.config import ConfigError

    with pytest.raises(ConfigError, match="model.family"):
        build_config({}, ["model.family=sdxl"])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_two_training_steps_end_to_end(family, saved_dirs, random_world, tmp_path):
    """train() on a saved tiny pipeline of the family: rollout, SRPO step, checkpoint, evaluation, LoRA export."""
    import json

    from directalign.training import train

    _, _, side, seq = SPECS[family]
    # eval.before: the base model's held-out reward is part of what this checks (tiny_config turns it off)
    cfg = tiny_config("srpo", f"model.family={family}", f"model.path={saved_dirs[family]}", "model.device=cpu",
                      f"model.height={side}", f"model.width={side}", f"model.max_sequence_length={seq}",
                      "train.steps=2", "srpo.rollout_guidance=2.0", "eval.before=true", run_dir=tmp_path / "run")
    result = train(cfg, log=lambda *_: None)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert np.isfinite(summary["reward_before"]) and np.isfinite(summary["reward_after"])
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert any((result.run_dir / "export").rglob("pytorch_lora_weights.safetensors"))
    assert isinstance(result.adapter, SPECS[family][1])


def test_qwen_vae_decode_checkpointing_gives_the_same_gradient():
    adapter, side = _adapter("qwen-image")
    x = adapter.noise(2, side, side, torch.Generator().manual_seed(2))
    grads = []
    for on in (False, True):
        adapter.decode_checkpointing = on
        xi = x.clone().requires_grad_(True)
        adapter.decode(xi, side, side).square().sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- eval loading
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_eval_loads_a_pipeline_and_an_exported_transformer_of_the_family(family, saved_dirs, tmp_path):
    """``directalign eval/sample`` read the family from model_index.json and load an exported transformer with the
    base's own class (not FLUX's)."""
    from directalign.eval.models import load_model, resolve_model

    _, cls, side, seq = SPECS[family]
    cfg = build_config({}, ["model.device=cpu", f"model.height={side}", f"model.width={side}",
                            f"model.max_sequence_length={seq}"])  # model.family stays the default (flux)
    pipe_ref = resolve_model(str(saved_dirs[family]), cfg)
    assert isinstance(load_model(pipe_ref, cfg), cls)

    trained, _ = _adapter(family)
    with torch.no_grad():
        for p in trained.transformer.parameters():
            p.add_(0.01)
    trained.transformer.save_pretrained(tmp_path / "transformer")
    ref = resolve_model(str(tmp_path / "transformer"), cfg, base=str(saved_dirs[family]))
    adapter = load_model(ref, cfg)
    assert isinstance(adapter, cls)
    want = trained.transformer.state_dict()
    got = adapter.transformer.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_eval_refuses_a_transformer_of_another_family(saved_dirs, tmp_path):
    from directalign.eval import EvalError
    from directalign.eval.models import load_model, resolve_model

    sd3, _ = _adapter("sd3")
    sd3.transformer.save_pretrained(tmp_path / "transformer")
    cfg = build_config({}, ["model.device=cpu", "model.height=16", "model.width=16", "model.max_sequence_length=64"])
    ref = resolve_model(str(tmp_path / "transformer"), cfg, base=str(saved_dirs["qwen-image"]))
    with pytest.raises(EvalError, match="is a SD3Transformer2DModel, but the base model's is a QwenImage"):
        load_model(ref, cfg)
