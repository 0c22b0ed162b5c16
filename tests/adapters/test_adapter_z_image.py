"""The Z-Image adapter on a tiny random-weight ``ZImagePipeline`` built from the real diffusers / transformers classes.

The rollout equals the pipeline's own sampler from the same latents (no CFG, CFG, CFG normalisation and truncation),
the noise is drawn as ``prepare_latents`` draws it, a full SRPO step trains the LoRA weights only, LoRA covers every
attention and feed-forward projection of every block, the exported LoRA and the merged transformer load back into
``ZImagePipeline`` with the same outputs, gradient checkpointing gives the same gradients, FSDP2 shards the
adapter's blocks, ``load_adapter`` loads a saved directory and names a missing component in one line, and the
shipped config carries the published settings.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from helpers import randomise_lora_b, record_branches, run_step, tiny_config

from directalign import flow
from directalign.adapters.loading import (
    FAMILIES,
    family_of_dir,
    load_adapter,
    vae_config,
)
from directalign.adapters.tiny_z_image import tiny_z_image_pipeline
from directalign.adapters.z_image import ZImageAdapter, guided_velocity
from directalign.config import build_config, load_config, packaged_config
from directalign.engine.finetune import DTYPES, apply_finetune_mode
from directalign.errors import TrainingError
from directalign.methods.registry import METHODS
from directalign.methods.sampling import rollout
from directalign.rewards.registry import load_reward

PROMPTS = ["a red circle on a blue background", "a green square"]
SIDE = 16
SEQ = 64
BLOCK_LISTS = ("noise_refiner", "context_refiner", "layers")


def _adapter(seed: int = 0, **kwargs) -> ZImageAdapter:
    return ZImageAdapter(tiny_z_image_pipeline(seed), max_sequence_length=SEQ, **kwargs)


def _cfg(extra=()):
    return tiny_config("srpo", "model.family=z-image", f"model.height={SIDE}", f"model.width={SIDE}",
                       "srpo.hinge_threshold=5.0", "srpo.quantize_timestep=0", *extra)


def _pipeline(pipe, adapter, noise, steps, guidance, output_type="latent"):
    """``ZImagePipeline`` itself from ``noise``; its guidance_scale g is ``guidance - 1`` (see adapters/z_image.py)."""
    sigmas = np.linspace(1.0, 1 / steps, steps).tolist()
    # list(): ZImagePipeline._encode_prompt writes the chat-templated prompts into the list it is given
    return pipe(list(PROMPTS), height=SIDE, width=SIDE, num_inference_steps=steps, sigmas=sigmas,
                latents=noise.clone(), guidance_scale=max(guidance - 1.0, 0.0),
                negative_prompt=[adapter.negative_prompt] * len(PROMPTS),
                cfg_normalization=adapter.cfg_normalization, cfg_truncation=adapter.cfg_truncation,
                output_type=output_type, max_sequence_length=adapter.max_sequence_length).images


def _rollout(adapter, noise, steps, guidance):
    shift = adapter.pipe.scheduler.config.shift
    return rollout(adapter, adapter.encode_prompts(PROMPTS), noise, steps, shift, guidance, SIDE, SIDE)


# ---------------------------------------------------------------------------------------------------- rollout
@pytest.mark.parametrize("guidance,normalization,truncation", [(1.0, 0.0, 1.0), (4.0, 0.0, 1.0), (3.0, 1.0, 1.0),
                                                               (3.0, 0.0, 0.1)])
def test_rollout_matches_the_pipeline_sampler(guidance, normalization, truncation):
    adapter = _adapter(cfg_normalization=normalization, cfg_truncation=truncation)
    steps = 3
    noise = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0))
    x0 = _rollout(adapter, noise, steps, guidance)
    ref = _pipeline(adapter.pipe, adapter, noise, steps, guidance)
    assert x0.shape == ref.shape == noise.shape
    assert float(ref.abs().mean()) > 0.1
    torch.testing.assert_close(x0, ref, rtol=0, atol=2e-5)
    images = _pipeline(adapter.pipe, adapter, noise, steps, guidance, output_type="pt")
    ours = adapter.decode(x0, SIDE, SIDE)
    assert ours.shape == (2, 3, SIDE, SIDE)
    torch.testing.assert_close(ours, images, rtol=0, atol=2e-5)
    if normalization or truncation < 1:  # the option changes the pipeline's output, so the match above means something
        plain = _adapter()
        assert (_pipeline(plain.pipe, plain, noise, steps, guidance) - ref).abs().max() > 1e-3


def test_guidance_is_the_usual_scale_and_normalisation_caps_the_norm():
    pos, neg = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(guided_velocity(pos, neg, 5.0), neg + 5.0 * (pos - neg))
    capped = guided_velocity(pos, neg, 5.0, normalization=1.0)
    norms = capped.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, pos.flatten(1).norm(dim=1))  # guided norm > |pos|: scaled down to |pos|
    loose = guided_velocity(pos, neg, 5.0, normalization=1e6)
    torch.testing.assert_close(loose, neg + 5.0 * (pos - neg))  # cap far above: unchanged


def test_velocity_is_the_negated_model_output_at_one_minus_sigma():
    adapter = _adapter()
    x = adapter.noise(1, SIDE, SIDE, torch.Generator().manual_seed(3))
    emb = adapter.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        v = adapter.velocity(x, torch.tensor([0.3]), emb, 1.0, SIDE, SIDE)
        raw = adapter.transformer([x[0, :, None]], torch.tensor([0.7]), [emb.tokens[0]], return_dict=False)[0][0]
    torch.testing.assert_close(v[0], -raw[:, 0], rtol=0, atol=1e-5)


def test_noise_matches_the_pipeline_prepare_latents():
    adapter = _adapter()
    ours = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(7))
    ref = adapter.pipe.prepare_latents(2, adapter.transformer.config.in_channels, SIDE, SIDE, torch.float32,
                                       torch.device("cpu"), torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_encode_images_inverts_the_latent_scaling():
    adapter = _adapter()
    images = torch.rand(2, 3, SIDE, SIDE)
    x = adapter.encode_images(images)
    assert x.shape == adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0)).shape
    cfg = adapter.vae.config
    with torch.no_grad():
        z = adapter.vae.encode(images * 2 - 1).latent_dist.mean
    torch.testing.assert_close(x / cfg.scaling_factor + cfg.shift_factor, z, rtol=1e-5, atol=1e-5)
    out = adapter.decode(x, SIDE, SIDE)
    assert out.shape == images.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_batches_of_different_prompt_lengths_match_single_prompts():
    adapter = _adapter()
    prompts = ["a red circle on a blue background with a plain texture", "a square"]
    batch = adapter.encode_prompts(prompts)
    assert batch.mask.sum(1).tolist()[0] > batch.mask.sum(1).tolist()[1] and batch.mask[1, -1] == 0
    x = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        both = adapter.velocity(x, sigma, batch, 3.0, SIDE, SIDE)
        for i, p in enumerate(prompts):
            one = adapter.velocity(x[i : i + 1], sigma[i : i + 1], adapter.encode_prompts([p]), 3.0, SIDE, SIDE)
            torch.testing.assert_close(both[i : i + 1], one, rtol=0, atol=2e-5)


def test_precomputed_prompt_embeddings_skip_the_text_encoder():
    adapter = _adapter()
    ref = adapter.encode_prompts(PROMPTS)
    other = _adapter()
    other.pipe.text_encoder = None
    with pytest.raises(RuntimeError, match="set_prompt_embeds"):
        other.encode_prompts(PROMPTS)
    other.set_prompt_embeds({p: ref[i : i + 1].tokens[:, : int(ref.mask[i].sum())] for i, p in enumerate(PROMPTS)})
    got = other.encode_prompts(PROMPTS)
    torch.testing.assert_close(got.tokens, ref.tokens)
    assert torch.equal(got.mask, ref.mask)


# ----------------------------------------------------------------------------------------- SRPO step and LoRA
def _setup(random_world, extra=()):
    adapter = _adapter()
    cfg = _cfg(extra)
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, torch.device("cpu"), spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)  # before fine-tuning, as training builds it
    torch.manual_seed(0)
    params = apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)
    return cfg, adapter, reward, method, params


@pytest.mark.parametrize("train_guidance", [1.0, 2.5])
def test_srpo_step_trains_the_lora_weights_only(train_guidance, random_world, monkeypatch):
    _, adapter, reward, method, params = _setup(random_world, [f"srpo.train_guidance={train_guidance}"])
    base = {n: p.detach().clone() for n, p in adapter.transformer.named_parameters() if "lora_" not in n}
    frozen = {id(m): [p.detach().clone() for p in m.parameters()] for m in (adapter.vae, adapter.pipe.text_encoder)}
    results = record_branches(monkeypatch, method)
    out = run_step(method, 0, PROMPTS, 3)
    assert [r.name for r in results] == ["denoise", "inversion"]
    assert np.isfinite(out.loss) and all(np.isfinite(v) for v in out.metrics.values())
    lora = {n: p for n, p in adapter.transformer.named_parameters() if "lora_" in n}
    assert lora and {id(p) for p in lora.values()} == {id(p) for p in params}
    for n, p in lora.items():  # single stream: every block's projections reach the image tokens
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, n
    for n, p in adapter.transformer.named_parameters():
        if "lora_" not in n:
            assert p.grad is None and not p.requires_grad, n
    for module in (adapter.vae, reward, adapter.pipe.text_encoder):
        assert all(p.grad is None for p in module.parameters())
    lora_before = {n: p.detach().clone() for n, p in lora.items()}
    torch.optim.AdamW(params, lr=1e-3).step()
    for n, p in adapter.transformer.named_parameters():
        if "lora_" in n:
            assert not torch.equal(p, lora_before[n]), n
        else:
            assert torch.equal(p, base[n]), n
    for m in (adapter.vae, adapter.pipe.text_encoder):
        assert all(torch.equal(a, b) for a, b in zip(m.parameters(), frozen[id(m)]))


def test_direct_align_step_recovers_x0_with_the_adapter_velocity():
    """The Direct-Align recovery through this adapter equals the closed form of paper Eq. 5 with its velocity."""
    adapter = _adapter()
    embeds = adapter.encode_prompts(PROMPTS)
    x0 = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(4))
    eps = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(5))
    sq, st = 0.8, 0.77

    def velocity(x, s):
        return adapter.velocity(x, s, embeds, 1.0, SIDE, SIDE)

    got = flow.direct_align_x0(x0, eps, sq, st, velocity)
    xq = sq * eps + (1 - sq) * x0
    with torch.no_grad():
        v = velocity(xq, torch.full((2,), sq))
    torch.testing.assert_close(got.detach(), (xq + (st - sq) * v - st * eps) / (1 - st), rtol=1e-5, atol=1e-5)


def test_lora_injection_covers_every_default_target_of_every_block():
    adapter = _adapter()
    x = adapter.noise(1, SIDE, SIDE, torch.Generator().manual_seed(0))
    embeds = adapter.encode_prompts(PROMPTS[:1])
    sigma = torch.tensor([0.5])
    with torch.no_grad():
        before = adapter.velocity(x, sigma, embeds, 1.0, SIDE, SIDE)
    params = apply_finetune_mode(_cfg().train, adapter)
    wrapped = {n.rsplit(".lora_A", 1)[0] for n, _ in adapter.transformer.named_parameters() if ".lora_A" in n}
    blocks = [f"{name}.{i}" for name in BLOCK_LISTS for i in range(len(getattr(adapter.transformer, name)))]
    assert len(blocks) == 4  # 1 noise refiner + 1 context refiner + 2 main layers
    expected = {f"{b}.{t}" for b in blocks for t in adapter.lora_target_modules}
    assert wrapped == expected
    assert all("lora_" in n for n, p in adapter.transformer.named_parameters() if p.requires_grad)
    assert len(params) == 2 * len(wrapped)
    with torch.no_grad():  # lora_B starts at zero: the model is unchanged
        after = adapter.velocity(x, sigma, embeds, 1.0, SIDE, SIDE)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_exported_lora_and_merged_transformer_load_into_the_pipeline(tmp_path):
    from diffusers import ZImagePipeline, ZImageTransformer2DModel

    from directalign.export import export_weights

    adapter = _adapter()
    cfg = _cfg()
    apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)
    adapter.transformer.eval()
    paths = export_weights(cfg, adapter, tmp_path / "export")
    noise = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0))
    trained = _rollout(adapter, noise, 2, 3.0)
    base = _rollout(_adapter(), noise, 2, 3.0)
    assert (trained - base).abs().max() > 1e-3

    fresh = tiny_z_image_pipeline(0)
    assert isinstance(fresh, ZImagePipeline)
    fresh.load_lora_weights(str(paths["lora"]))
    torch.testing.assert_close(_pipeline(fresh, adapter, noise, 2, 3.0), trained, rtol=1e-5, atol=1e-5)

    merged = tiny_z_image_pipeline(0)
    merged.transformer = ZImageTransformer2DModel.from_pretrained(str(paths["transformer"]))
    assert not any("lora_" in n for n, _ in merged.transformer.named_parameters())
    torch.testing.assert_close(_pipeline(merged, adapter, noise, 2, 3.0), trained, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(random_world):
    grads = []
    for checkpointing in (False, True):
        _, adapter, _, method, _ = _setup(
            random_world, [f"train.gradient_checkpointing={str(checkpointing).lower()}", "srpo.train_guidance=2.0"])
        assert adapter.transformer.gradient_checkpointing is checkpointing
        run_step(method, 1, PROMPTS, 9)
        grads.append({n: p.grad.clone() for n, p in adapter.transformer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)


def test_fsdp2_shards_every_block_the_adapter_names(monkeypatch):
    """Full fine-tuning on several ranks: FineTuning.setup shards each ZImageTransformerBlock (from the adapter's
    fsdp_block_names), then the root. fully_shard is recorded, not run (no process group here)."""
    from diffusers.models.transformers.transformer_z_image import ZImageTransformerBlock
    from torch.distributed import fsdp

    from directalign.engine.distributed import DistInfo, shard_full_model
    from directalign.engine.finetune import FineTuning

    sharded = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **kw: sharded.append(module) or module)
    adapter = _adapter()
    blocks = [m for m in adapter.transformer.modules() if isinstance(m, ZImageTransformerBlock)]
    assert len(blocks) == 4
    shard_full_model(adapter.transformer, DistInfo(0, 2, 0))  # the FLUX default names find no block here
    assert sharded == [adapter.transformer]
    sharded.clear()
    cfg = _cfg(["train.finetune=full", "train.distributed=fsdp"])
    ft = FineTuning.setup(cfg.train, adapter, DistInfo(0, 2, 0))
    assert ft.fsdp
    assert [id(m) for m in sharded] == [id(b) for b in blocks] + [id(adapter.transformer)]
    assert {n for n, _ in adapter.transformer.named_children() if n in adapter.fsdp_block_names} == set(BLOCK_LISTS)


def test_fsdp2_sharded_transformer_gives_the_unsharded_gradients(tmp_path):
    """Real FSDP2 on a one-rank gloo group (a file store: no socket): the adapter's blocks become FSDP units and a
    CFG velocity's gradients equal the plain module's."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from directalign.engine.distributed import DistInfo, shard_full_model

    plain, sharded = _adapter(), _adapter()
    for a in (plain, sharded):
        a.transformer.requires_grad_(True)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        # DistInfo says "several ranks" so that shard_full_model shards; the group itself has one rank
        shard_full_model(sharded.transformer, DistInfo(0, 2, 0), None, sharded.fsdp_block_names)
        units = [m for m in sharded.transformer.modules() if isinstance(m, FSDPModule)]
        assert len(units) == 5  # 4 blocks + the root
        x = plain.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0))
        emb = plain.encode_prompts(PROMPTS)
        for a in (plain, sharded):
            a.velocity(x, torch.tensor([0.6, 0.3]), emb, 3.0, SIDE, SIDE).square().mean().backward()
        want = dict(plain.transformer.named_parameters())
        for n, p in sharded.transformer.named_parameters():
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            torch.testing.assert_close(grad, want[n].grad, rtol=1e-5, atol=1e-7, msg=n)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- loading
@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("z-image") / "pipe"
    tiny_z_image_pipeline(0).save_pretrained(root)
    return root


def _load(cfg):
    return load_adapter(cfg.model, torch.device("cpu"), DTYPES[cfg.model.dtype])


def test_load_adapter_loads_a_saved_directory(saved_dir):
    assert family_of_dir(saved_dir) == "z-image"
    cfg = build_config({}, ["model.family=z-image", f"model.path={saved_dir}", "model.device=cpu",
                            f"model.height={SIDE}", f"model.width={SIDE}", f"model.max_sequence_length={SEQ}"])
    adapter = _load(cfg)
    assert isinstance(adapter, ZImageAdapter) and adapter.family == "z-image"
    assert adapter.resolution_multiple == FAMILIES["z-image"].resolution_multiple(vae_config(saved_dir)) == 4
    ref = _adapter()
    x = ref.noise(1, SIDE, SIDE, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = adapter.velocity(x, torch.tensor([0.5]), adapter.encode_prompts(PROMPTS[:1]), 3.0, SIDE, SIDE)
        b = ref.velocity(x, torch.tensor([0.5]), ref.encode_prompts(PROMPTS[:1]), 3.0, SIDE, SIDE)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert adapter.identity() == ref.identity()


@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder", "tokenizer", "scheduler"])
def test_load_adapter_names_a_missing_component(component, saved_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved_dir, broken)
    shutil.rmtree(broken / component)
    cfg = build_config({}, ["model.family=z-image", f"model.path={broken}", "model.device=cpu"])
    with pytest.raises(TrainingError) as e:
        _load(cfg)
    msg = str(e.value)
    assert "\n" not in msg and component in msg and "ZImagePipeline" in msg


def test_load_adapter_names_the_family_a_directory_holds(saved_dir):
    cfg = build_config({}, ["model.family=flux", f"model.path={saved_dir}", "model.device=cpu"])
    with pytest.raises(TrainingError, match="set model.family=z-image"):
        _load(cfg)


def test_two_training_steps_end_to_end(saved_dir, random_world, tmp_path):
    """train() on a saved tiny Z-Image pipeline: rollout with CFG, SRPO step, checkpoint, evaluation, LoRA export."""
    import json

    from directalign.training import train

    cfg = tiny_config("srpo", "model.family=z-image", f"model.path={saved_dir}", "model.device=cpu",
                      f"model.height={SIDE}", f"model.width={SIDE}", f"model.max_sequence_length={SEQ}",
                      "train.steps=2", "srpo.rollout_guidance=2.0", "eval.before=true", run_dir=tmp_path / "run")
    result = train(cfg, log=lambda *_: None)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert np.isfinite(summary["reward_before"]) and np.isfinite(summary["reward_after"])
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert any((result.run_dir / "export").rglob("pytorch_lora_weights.safetensors"))
    assert isinstance(result.adapter, ZImageAdapter)


def test_eval_loads_the_pipeline_and_an_exported_transformer(saved_dir, tmp_path):
    """``directalign eval/sample`` read the family from model_index.json and load an exported transformer with
    ZImageTransformer2DModel."""
    from directalign.eval.models import load_model, resolve_model

    cfg = build_config({}, ["model.device=cpu", f"model.height={SIDE}", f"model.width={SIDE}",
                            f"model.max_sequence_length={SEQ}"])  # model.family stays the default (flux)
    assert isinstance(load_model(resolve_model(str(saved_dir), cfg), cfg), ZImageAdapter)
    trained = _adapter()
    with torch.no_grad():
        for p in trained.transformer.parameters():
            p.add_(0.01)
    trained.transformer.save_pretrained(tmp_path / "transformer")
    adapter = load_model(resolve_model(str(tmp_path / "transformer"), cfg, base=str(saved_dir)), cfg)
    assert isinstance(adapter, ZImageAdapter)
    want, got = trained.transformer.state_dict(), adapter.transformer.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


# ---------------------------------------------------------------------------------------------------- config
def test_z_image_hpsv2_config_carries_the_published_settings():
    cfg = load_config(packaged_config("z-image-srpo-hpsv2"))
    s, m = cfg.srpo, cfg.model
    assert (cfg.method, m.family, m.path, cfg.reward.kind) == ("srpo", "z-image", "Tongyi-MAI/Z-Image", "hpsv2")
    assert (m.height, m.width, m.max_sequence_length) == (1024, 1024, 512)
    assert m.height % FAMILIES["z-image"].resolution_multiple() == 0  # 16: VAE factor 8 x 2x2 patches
    assert cfg.sampling.shift == 6.0  # the checkpoint's scheduler_config.json
    # ZImagePipeline guidance_scale 4 is guidance 5.0 here; 50 published steps at evaluation
    assert (s.rollout_guidance, s.train_guidance, cfg.eval.guidance, cfg.eval.steps) == (5.0, 1.0, 5.0, 50)
    assert 28 <= s.rollout_steps <= 50
    grid = flow.training_sigma_grid(s.schedule_steps, cfg.sampling.shift, *s.window, s.grid_points)
    official = flow.training_sigma_grid(50, 3.0, 5, 25, 1000)  # the official FLUX HPS window
    assert float(grid[0]) == pytest.approx(float(official[0]), abs=2e-3)
    assert float(grid[-1]) == pytest.approx(float(official[-1]), abs=1e-2)
    assert cfg.train.gradient_checkpointing and cfg.train.finetune == "lora"
