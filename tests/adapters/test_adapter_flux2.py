"""The FLUX.2-dev (``Flux2Pipeline``) and FLUX.2-klein (``Flux2KleinPipeline``) adapters on tiny random-weight
instances of the real classes (``adapters.tiny_flux2``): prompts, noise, image latents and the rollout equal the
pipeline's own code; an SRPO step reaches the LoRA weights only; LoRA covers every block linear; LoRA and merged exports
reload into the pipeline; checkpointing gives the same gradients; FSDP2 wraps the blocks the adapter names; loading
a saved directory, its one-line errors, and the shipped configs' published settings."""

from __future__ import annotations

import copy
import math
import shutil

import numpy as np
import pytest
import torch
from helpers import randomise_lora_b, record_branches, run_step, tiny_config

from directalign import flow
from directalign.adapters import flux2
from directalign.adapters.flux2 import Flux2Adapter, Flux2KleinAdapter
from directalign.adapters.loading import FAMILIES, load_adapter
from directalign.adapters.tiny_flux2 import (
    DEV_TOKENS,
    KLEIN_TOKENS,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
)
from directalign.config import build_config, load_config, packaged_config
from directalign.engine.finetune import DTYPES, apply_finetune_mode
from directalign.errors import TrainingError
from directalign.methods.registry import METHODS
from directalign.methods.sampling import rollout
from directalign.rewards.registry import load_reward

PROMPTS = ["a red circle on a blue background", "a green square"]
SIDE = 16  # tiny VAE factor 2 x 2x2 patches: 16x16 images -> 16 packed tokens

# family -> (pipeline builder, adapter class, max_sequence_length)
SPECS = {
    "flux2": (tiny_flux2_pipeline, Flux2Adapter, DEV_TOKENS),
    "flux2-klein": (tiny_flux2_klein_pipeline, Flux2KleinAdapter, KLEIN_TOKENS),
}
FAMILY_NAMES = list(SPECS)
_PROTOTYPES: dict[str, object] = {}


def _pipe(family: str):
    """A fresh copy of the family's tiny pipeline (built once per session, deep-copied per test)."""
    if family not in _PROTOTYPES:
        _PROTOTYPES[family] = SPECS[family][0](0)
    return copy.deepcopy(_PROTOTYPES[family])


def _adapter(family: str):
    _, cls, seq = SPECS[family]
    return cls(_pipe(family), max_sequence_length=seq)


def _cfg(family: str, extra=()):
    return tiny_config("srpo", f"model.family={family}", f"model.height={SIDE}", f"model.width={SIDE}",
                       "srpo.hinge_threshold=5.0", "srpo.quantize_timestep=0", *extra)


def _velocity(adapter, x, sigma, prompts=PROMPTS[:1], guidance=1.0):
    with torch.no_grad():
        return adapter.velocity(x, torch.tensor([sigma]), adapter.encode_prompts(prompts), guidance, SIDE, SIDE)


# ---------------------------------------------------------------------------------------------------- the pipeline
def _pipeline_run(adapter, noise, steps, guidance):
    """The pipeline's own sampler from ``noise``: (its final packed latents, its images in [0, 1])."""
    seen = {}

    def keep(pipe, i, t, kwargs):
        seen["latents"] = kwargs["latents"]
        return {}

    h = SIDE // adapter.vae_scale_factor // 2
    images = adapter.pipe(prompt=PROMPTS, height=SIDE, width=SIDE, num_inference_steps=steps,
                          guidance_scale=guidance, latents=flux2.unpack(noise, h, h).clone(), output_type="pt",
                          max_sequence_length=adapter.max_sequence_length, callback_on_step_end=keep).images
    return seen["latents"], images


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_rollout_matches_the_pipeline_sampler(family, guidance):
    adapter = _adapter(family)
    steps = 3
    shift = adapter.schedule_shift(SIDE, SIDE, steps)
    # the dynamic schedule is the static shift e^mu: the scheduler's own sigmas, closed form
    sched = adapter.pipe.scheduler
    mu = math.log(shift)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    torch.testing.assert_close(sched.sigmas.double(), flow.sigma_schedule(steps, shift), rtol=0, atol=1e-6)
    noise = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0))
    x0 = rollout(adapter, adapter.encode_prompts(PROMPTS), noise, steps, shift, guidance, SIDE, SIDE)
    ref, images = _pipeline_run(adapter, noise, steps, guidance)
    assert x0.shape == ref.shape == noise.shape
    assert float(ref.abs().mean()) > 0.1
    torch.testing.assert_close(x0, ref, rtol=0, atol=2e-5)
    ours = adapter.decode(x0, SIDE, SIDE)
    assert ours.shape == (2, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, images, rtol=0, atol=2e-5)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_guidance_reaches_the_model_as_each_pipeline_uses_it(family):
    """dev: the guidance embedding (one pass); klein: true CFG against "" (closed form from two guidance-1 passes)."""
    adapter = _adapter(family)
    x = adapter.noise(1, SIDE, SIDE, torch.Generator().manual_seed(3))
    v1, v4 = _velocity(adapter, x, 0.6, guidance=1.0), _velocity(adapter, x, 0.6, guidance=4.0)
    assert (v4 - v1).abs().max() > 1e-4
    if family == "flux2-klein":
        v_neg = _velocity(adapter, x, 0.6, prompts=[""], guidance=1.0)
        torch.testing.assert_close(v4, v_neg + 4.0 * (v1 - v_neg), rtol=1e-5, atol=1e-5)
        distilled = Flux2KleinAdapter(tiny_flux2_klein_pipeline(0, is_distilled=True), KLEIN_TOKENS)
        torch.testing.assert_close(_velocity(distilled, x, 0.6, guidance=4.0),
                                   _velocity(distilled, x, 0.6, guidance=1.0), rtol=0, atol=0)
    else:
        assert adapter.has_guidance_embedding


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_noise_and_image_latents_match_the_pipeline(family):
    adapter = _adapter(family)
    pipe = adapter.pipe
    ours = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(7))
    ref, _ = pipe.prepare_latents(2, adapter.transformer.config.in_channels // 4, SIDE, SIDE, torch.float32,
                                  torch.device("cpu"), torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)
    images = torch.rand(2, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1))
    x = adapter.encode_images(images)
    with torch.no_grad():
        want = flux2.pack(pipe._encode_vae_image(images * 2 - 1, None))  # batch-norm normalised, patchified
    torch.testing.assert_close(x, want, rtol=0, atol=1e-6)
    assert x.shape == ours.shape
    back = adapter.decode(x, SIDE, SIDE)
    assert back.shape == images.shape and float(back.min()) >= 0 and float(back.max()) <= 1


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_prompt_embeddings_are_the_pipelines_and_cached_per_prompt(family, monkeypatch):
    adapter = _adapter(family)
    got = adapter.encode_prompts(PROMPTS)
    with torch.no_grad():
        want, _ = adapter.pipe.encode_prompt(PROMPTS, max_sequence_length=adapter.max_sequence_length)
    assert got.tokens.shape == (2, adapter.max_sequence_length, adapter.transformer.config.joint_attention_dim)
    torch.testing.assert_close(got.tokens, want, rtol=0, atol=1e-6)

    def refuse(*_a, **_k):
        raise AssertionError("the text encoder ran for a cached prompt")

    monkeypatch.setattr(adapter.pipe.text_encoder, "forward", refuse)
    again = adapter.encode_prompts(PROMPTS[::-1])
    torch.testing.assert_close(again.tokens, got.tokens.flip(0), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------- SRPO step and LoRA
def _setup(family, extra=()):
    adapter = _adapter(family)
    cfg = _cfg(family, extra)
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, torch.device("cpu"), spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)  # before fine-tuning, as training builds it
    torch.manual_seed(0)
    params = apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)
    return cfg, adapter, reward, method, params


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("train_guidance", [1.0, 2.5])
def test_srpo_step_gradients_reach_only_lora_parameters(family, train_guidance, random_world, monkeypatch):
    _, adapter, reward, method, params = _setup(family, [f"srpo.train_guidance={train_guidance}"])
    base = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters() if "lora_" not in n}
    results = record_branches(monkeypatch, method)
    out = run_step(method, 0, PROMPTS, 3)
    assert [r.name for r in results] == ["denoise", "inversion"]
    assert all(np.isfinite(r.loss) for r in results)
    assert np.isfinite(out.loss) and all(np.isfinite(v) for v in out.metrics.values())
    lora = {n: p for n, p in adapter.transformer.named_parameters() if "lora_" in n}
    assert lora and {id(p) for p in lora.values()} == {id(p) for p in params}
    for n, p in lora.items():  # text and image tokens meet in the single-stream blocks: every LoRA layer matters
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
    for n, p in adapter.transformer.named_parameters():
        if "lora_" not in n:
            assert p.grad is None and not p.requires_grad, n
    for module in (adapter.vae, reward, adapter.pipe.text_encoder):
        assert all(p.grad is None for p in module.parameters())
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    torch.optim.AdamW(params, lr=1e-3).step()
    assert all(not torch.equal(p.detach(), lora_before[n]) for n, p in lora.items())
    for n, p in adapter.transformer.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p.detach(), base[n]), n  # bit-identical after the update


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_lora_injection_covers_every_default_target(family):
    adapter = _adapter(family)
    cfg = _cfg(family)
    names = [n for n, _ in adapter.transformer.named_modules()]
    targets = adapter.lora_target_modules
    for target in targets:
        assert any(n == target or n.endswith("." + target) for n in names), f"{target} is not in the transformer"
    # every linear layer inside the blocks (attention and MLP of both block kinds) is to be adapted
    block_linears = {n for n, m in adapter.transformer.named_modules()
                     if n.startswith(("transformer_blocks.", "single_transformer_blocks."))
                     and isinstance(m, torch.nn.Linear)}
    x = adapter.noise(1, SIDE, SIDE, torch.Generator().manual_seed(0))
    before = _velocity(adapter, x, 0.5)
    params = apply_finetune_mode(cfg.train, adapter)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in adapter.transformer.named_parameters() if ".lora_A" in n}
    for target in targets:
        assert any(w.endswith(target) for w in wrapped), f"no LoRA on {target}"
    assert wrapped == block_linears
    assert all("lora_" in n for n, p in adapter.transformer.named_parameters() if p.requires_grad)
    assert len(params) == 2 * len(wrapped)
    torch.testing.assert_close(_velocity(adapter, x, 0.5), before, rtol=0, atol=0)  # lora_B = 0: unchanged


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_exported_lora_and_merged_transformer_reload_into_the_pipeline(family, tmp_path):
    from directalign.export import export_weights

    adapter = _adapter(family)
    cfg = _cfg(family)
    apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)
    adapter.transformer.eval()
    paths = export_weights(cfg, adapter, tmp_path / "export")
    x = adapter.noise(1, SIDE, SIDE, torch.Generator().manual_seed(0))
    trained = _velocity(adapter, x, 0.6, guidance=2.0)
    fresh = _adapter(family)
    assert (trained - _velocity(fresh, x, 0.6, guidance=2.0)).abs().max() > 1e-4
    fresh.pipe.load_lora_weights(str(paths["lora"]))
    torch.testing.assert_close(_velocity(fresh, x, 0.6, guidance=2.0), trained, rtol=1e-5, atol=1e-5)
    merged = type(adapter.transformer).from_pretrained(str(paths["transformer"]))
    fresh2 = _adapter(family)
    fresh2.pipe.transformer = merged
    torch.testing.assert_close(_velocity(fresh2, x, 0.6, guidance=2.0), trained, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_gradient_checkpointing_gives_the_same_gradients(family, random_world):
    grads = []
    for checkpointing in (False, True):
        _, adapter, _, method, _ = _setup(
            family, [f"train.gradient_checkpointing={str(checkpointing).lower()}", "srpo.train_guidance=2.0"])
        assert adapter.transformer.gradient_checkpointing is checkpointing
        run_step(method, 1, PROMPTS, 9)
        grads.append({n: p.grad.clone() for n, p in adapter.transformer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_fsdp2_wraps_every_block_the_adapter_names(tmp_path):
    """``shard_full_model`` with the adapter's ``fsdp_block_names`` (a one-process gloo group): each double- and
    single-stream block is its own FSDP2 unit and the sharded model computes what the plain one does."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from directalign.engine.distributed import DistInfo, shard_full_model

    adapter = _adapter("flux2")
    x = adapter.noise(1, SIDE, SIDE, torch.Generator().manual_seed(0))
    before = _velocity(adapter, x, 0.5, guidance=3.0)
    t = adapter.transformer
    assert all(len(getattr(t, name)) > 0 for name in adapter.fsdp_block_names)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shard_full_model(t, DistInfo(rank=0, world_size=2), None, adapter.fsdp_block_names)
        blocks = [*t.transformer_blocks, *t.single_transformer_blocks]
        assert all(isinstance(b, FSDPModule) for b in blocks) and isinstance(t, FSDPModule)
        after = _velocity(adapter, x, 0.5, guidance=3.0)
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2-families")
    out = {}
    for family in SPECS:
        _pipe(family).save_pretrained(root / family)
        out[family] = root / family
    return out


def _load(cfg):
    return load_adapter(cfg.model, torch.device("cpu"), DTYPES[cfg.model.dtype])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_load_adapter_loads_a_saved_directory(family, saved_dirs):
    _, cls, seq = SPECS[family]
    cfg = build_config({}, [f"model.family={family}", f"model.path={saved_dirs[family]}", "model.device=cpu",
                            f"model.height={SIDE}", f"model.width={SIDE}", f"model.max_sequence_length={seq}"])
    adapter = _load(cfg)
    assert isinstance(adapter, cls) and adapter.family == family
    assert FAMILIES[family].resolution_multiple(dict(adapter.vae.config)) == adapter.resolution_multiple == 4
    ref = _adapter(family)
    x = ref.noise(1, SIDE, SIDE, torch.Generator().manual_seed(0))
    torch.testing.assert_close(_velocity(adapter, x, 0.5, guidance=2.0), _velocity(ref, x, 0.5, guidance=2.0),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,component", [("flux2", "text_encoder"), ("flux2", "tokenizer"),
                                              ("flux2-klein", "vae"), ("flux2-klein", "scheduler")])
def test_load_adapter_names_a_missing_component(family, component, saved_dirs, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_dirs[family], broken)
    shutil.rmtree(broken / component)
    cfg = build_config({}, [f"model.family={family}", f"model.path={broken}", "model.device=cpu"])
    with pytest.raises(TrainingError) as e:
        _load(cfg)
    msg = str(e.value)
    assert "\n" not in msg and component in msg and FAMILIES[family].pipeline in msg


def test_load_adapter_names_the_family_a_directory_holds(saved_dirs):
    cfg = build_config({}, ["model.family=flux2", f"model.path={saved_dirs['flux2-klein']}", "model.device=cpu"])
    with pytest.raises(TrainingError, match="set model.family=flux2-klein"):
        _load(cfg)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_two_training_steps_end_to_end(family, saved_dirs, random_world, tmp_path):
    """train() on a saved tiny pipeline of the family: preflight, rollout, SRPO step, checkpoint, evaluation, export."""
    import json

    from directalign.training import train

    _, cls, seq = SPECS[family]
    cfg = tiny_config("srpo", f"model.family={family}", f"model.path={saved_dirs[family]}", "model.device=cpu",
                      f"model.height={SIDE}", f"model.width={SIDE}", f"model.max_sequence_length={seq}",
                      "train.steps=2", "srpo.rollout_guidance=2.0", "eval.before=true", run_dir=tmp_path / "run")
    result = train(cfg, log=lambda *_: None)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert np.isfinite(summary["reward_before"]) and np.isfinite(summary["reward_after"])
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert any((result.run_dir / "export").rglob("pytorch_lora_weights.safetensors"))
    assert isinstance(result.adapter, cls)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_eval_loads_a_pipeline_and_an_exported_transformer_of_the_family(family, saved_dirs, tmp_path):
    """``directalign eval/sample`` read the family from model_index.json and load an exported transformer with the
    base's own class."""
    from directalign.eval.models import load_model, resolve_model

    _, cls, seq = SPECS[family]
    cfg = build_config({}, ["model.device=cpu", f"model.height={SIDE}", f"model.width={SIDE}",
                            f"model.max_sequence_length={seq}"])  # model.family stays the default (flux)
    assert isinstance(load_model(resolve_model(str(saved_dirs[family]), cfg), cfg), cls)
    trained = _adapter(family)
    with torch.no_grad():
        for p in trained.transformer.parameters():
            p.add_(0.01)
    trained.transformer.save_pretrained(tmp_path / "transformer")
    adapter = load_model(resolve_model(str(tmp_path / "transformer"), cfg, base=str(saved_dirs[family])), cfg)
    assert isinstance(adapter, cls)
    want, got = trained.transformer.state_dict(), adapter.transformer.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name,family,hub_id,guidance", [
    ("flux2-dev-srpo-hpsv2", "flux2", "black-forest-labs/FLUX.2-dev", 4.0),
    ("flux2-klein-srpo-hpsv2", "flux2-klein", "black-forest-labs/FLUX.2-klein-base-4B", 4.0),
])
def test_shipped_configs_carry_the_published_settings(name, family, hub_id, guidance):
    cfg = load_config(packaged_config(name))
    s, e = cfg.srpo, cfg.eval
    assert (cfg.method, cfg.model.family, cfg.model.path, cfg.reward.kind) == ("srpo", family, hub_id, "hpsv2")
    assert (cfg.model.height, cfg.model.width, cfg.model.max_sequence_length) == (1024, 1024, 512)
    assert (e.steps, e.guidance) == (50, guidance)  # the model card's / pipeline's defaults
    # the pipelines' dynamic shift at 1024x1024 and 50 steps (mu = 2.0234), as a static shift
    assert cfg.sampling.shift == pytest.approx(flux2.dynamic_shift(1024, 1024, 50), abs=1e-3)
    assert cfg.model.height % FAMILIES[family].resolution_multiple() == 0
    # the window spans the sigmas of the official FLUX.1 window (0.964 .. 0.75) on this schedule
    grid = flow.training_sigma_grid(s.schedule_steps, cfg.sampling.shift, *s.window, s.grid_points)
    assert float(grid[0]) == pytest.approx(0.964, abs=0.01) and float(grid[-1]) == pytest.approx(0.75, abs=0.02)
    assert cfg.train.finetune == "lora" and cfg.train.gradient_checkpointing
