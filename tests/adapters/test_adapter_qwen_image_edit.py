"""The Qwen-Image-Edit adapters on tiny random-weight instances of the real diffusers / transformers classes.

The rollout equals ``QwenImageEditPipeline``'s (and ``QwenImageEditPlusPipeline``'s) own sampler for the same noise,
sigmas and source image (guidance 1 and true CFG); SRPO and the baselines train LoRA on edit prompts with the base
weights untouched; the exported LoRA and merged transformer reload into the real pipeline with its own output;
prompt manifests (and offline manifests) bring each prompt's source image to the adapter, and every bad source is
one line; ``load_adapter`` loads a saved edit pipeline.

The pipelines size the source image to a 1024 x 1024 area (384 x 384 for Plus's VL copy); the ``small_conditions``
fixture shrinks both areas, on the pipelines' side (their ``calculate_dimensions``) and on the adapter's.
"""

from __future__ import annotations

import json
import shutil

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_module
import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as plus_module
import numpy as np
import pytest
import torch
from helpers import randomise_lora_b, record_branches, run_step, tiny_config
from PIL import Image

from directalign import source_images
from directalign.adapters.loading import FAMILIES, family_of_dir, load_adapter
from directalign.adapters.qwen_image_edit import (
    EditEmbeds,
    QwenImageEditAdapter,
    QwenImageEditPlusAdapter,
    condition_size,
)
from directalign.adapters.tiny_qwen_image_edit import tiny_qwen_image_edit_pipeline
from directalign.config import build_config
from directalign.engine.finetune import DTYPES, apply_finetune_mode
from directalign.methods.registry import METHODS
from directalign.methods.sampling import rollout
from directalign.rewards.registry import load_reward
from directalign.source_images import SourceImageError

PROMPTS = ["make the circle red", "turn the square green"]
SIDE, SEQ = 16, 64
AREA, VL_AREA = 64 * 32, 32 * 32  # stand-ins for 1024 * 1024 and 384 * 384
ADAPTERS = {"qwen-image-edit": QwenImageEditAdapter, "qwen-image-edit-plus": QwenImageEditPlusAdapter}


@pytest.fixture(autouse=True)
def small_conditions(monkeypatch):
    small = {1024 * 1024: AREA, 384 * 384: VL_AREA}
    for module in (edit_module, plus_module):
        monkeypatch.setattr(module, "calculate_dimensions",
                            lambda area, ratio, _orig=module.calculate_dimensions: _orig(small[area], ratio))
    monkeypatch.setattr(QwenImageEditAdapter, "condition_area", AREA)
    monkeypatch.setattr(QwenImageEditPlusAdapter, "vl_area", VL_AREA)


def _images(n=2, size=(48, 24), seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _adapter(family="qwen-image-edit", images=None):
    adapter = ADAPTERS[family](tiny_qwen_image_edit_pipeline(0, plus=family.endswith("plus")), SEQ)
    adapter.set_source_images(dict(zip(PROMPTS, images or _images())))
    return adapter


def _sigmas(steps):
    return np.linspace(1.0, 1 / steps, steps).tolist()


def _pipeline(pipe, image, prompt, noise, steps, guidance, output_type="latent"):
    """The pipeline's own sampler for one prompt and its source image (the documented single-image call)."""
    return pipe(image=image, prompt=prompt, negative_prompt=" " if guidance > 1 else None, true_cfg_scale=guidance,
                height=SIDE, width=SIDE, num_inference_steps=steps, sigmas=_sigmas(steps), latents=noise.clone(),
                output_type=output_type, max_sequence_length=SEQ).images


# ---------------------------------------------------------------------------------------------------- rollout
def test_condition_size_is_the_pipelines_calculate_dimensions():
    orig = edit_module.calculate_dimensions.__defaults__[0]  # the unpatched function (fixture default argument)
    for w, h, area in [(1024, 768, 1024 * 1024), (500, 1200, 1024 * 1024), (640, 640, 384 * 384)]:
        assert condition_size(w, h, area) == orig(area, w / h)[:2]
    assert condition_size(1000, 1000, 1024 * 1024) == (1024, 1024)


@pytest.mark.parametrize("family", list(ADAPTERS))
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_rollout_matches_the_edit_pipeline_sampler(family, guidance):
    images = _images()
    adapter = _adapter(family, images)
    steps = 3
    noise = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0))
    x0 = rollout(adapter, adapter.encode_prompts(PROMPTS), noise, steps, 1.0, guidance, SIDE, SIDE)
    decoded = adapter.decode(x0, SIDE, SIDE)
    for i in range(2):
        ref = _pipeline(adapter.pipe, images[i], PROMPTS[i], noise[i : i + 1], steps, guidance)
        assert float(ref.abs().mean()) > 0.1
        torch.testing.assert_close(x0[i : i + 1], ref, rtol=0, atol=2e-5)
        pixels = _pipeline(adapter.pipe, images[i], PROMPTS[i], noise[i : i + 1], steps, guidance, "pt")
        torch.testing.assert_close(decoded[i : i + 1], pixels, rtol=0, atol=2e-5)


def test_the_source_image_conditions_the_velocity():
    a, b = _adapter(images=_images(seed=0)), _adapter(images=_images(seed=1))
    x = a.noise(2, SIDE, SIDE, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.6, 0.6])
    with torch.no_grad():
        va = a.velocity(x, sigma, a.encode_prompts(PROMPTS), 1.0, SIDE, SIDE)
        vb = b.velocity(x, sigma, b.encode_prompts(PROMPTS), 1.0, SIDE, SIDE)
    assert (va - vb).abs().max() > 1e-3


def test_a_batch_of_mixed_aspect_ratios_equals_its_rows_and_slices():
    wide, tall = _images(1, (48, 24))[0], _images(1, (24, 48), seed=2)[0]
    adapter = _adapter(images=[wide, tall])
    embeds = adapter.encode_prompts(PROMPTS)
    assert embeds.grids[0] != embeds.grids[1]  # 64x32 vs 32x64 condition images
    x = adapter.noise(2, SIDE, SIDE, torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.7, 0.4])
    with torch.no_grad():
        both = adapter.velocity(x, sigma, embeds, 2.5, SIDE, SIDE)
        for i, p in enumerate(PROMPTS):
            one = adapter.velocity(x[i : i + 1], sigma[i : i + 1], adapter.encode_prompts([p]), 2.5, SIDE, SIDE)
            torch.testing.assert_close(both[i : i + 1], one, rtol=0, atol=2e-5)
            sliced = adapter.velocity(x[i : i + 1], sigma[i : i + 1], embeds[i : i + 1], 2.5, SIDE, SIDE)
            torch.testing.assert_close(sliced, one, rtol=0, atol=2e-5)
    joined = EditEmbeds.cat([embeds[1:], embeds[:1]])
    assert joined.keys == embeds.keys[::-1]


def test_a_prompt_without_a_source_image_is_one_line():
    adapter = _adapter()
    with pytest.raises(SourceImageError) as e:
        adapter.encode_prompts(["make it blue\nand shiny"])
    assert "\n" not in str(e.value) and "make it blue" in str(e.value) and "'image'" in str(e.value)


# ----------------------------------------------------------------------------------------- training and LoRA
def _cfg(method="srpo", family="qwen-image-edit", extra=()):
    srpo = ["srpo.hinge_threshold=5.0", "srpo.quantize_timestep=0"] if method in ("srpo", "direct-align") else []
    return tiny_config(method, f"model.family={family}", f"model.height={SIDE}", f"model.width={SIDE}", *srpo,
                       *extra)


def _setup(cfg, adapter):
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, torch.device("cpu"), spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)
    torch.manual_seed(0)
    params = apply_finetune_mode(cfg.train, adapter)
    randomise_lora_b(adapter.transformer)  # peft starts lora_B at 0: give both factors a signal
    return reward, method, params


def _base_weights(adapter):
    return {n: p.detach().clone() for n, p in adapter.transformer.named_parameters() if "lora_" not in n}


@pytest.mark.parametrize("family", list(ADAPTERS))
def test_srpo_step_on_edits_trains_lora_only(family, random_world, monkeypatch):
    adapter = _adapter(family)
    cfg = _cfg("srpo", family, ["srpo.rollout_guidance=2.0"])
    reward, method, params = _setup(cfg, adapter)
    base = _base_weights(adapter)
    lora_before = [p.detach().clone() for p in params]
    results = record_branches(monkeypatch, method)
    out = run_step(method, 0, PROMPTS, 3)
    assert [r.name for r in results] == ["denoise", "inversion"] and np.isfinite(out.loss)
    lora = {n: p for n, p in adapter.transformer.named_parameters() if "lora_" in n}
    assert {id(p) for p in lora.values()} == {id(p) for p in params}
    with_grad = [n for n, p in lora.items() if p.grad is not None and p.grad.abs().max() > 0]
    assert all(torch.isfinite(p.grad).all() for p in lora.values() if p.grad is not None)
    assert len(with_grad) > 0.8 * len(lora)  # all but the last block's discarded text-stream outputs
    for n, p in adapter.transformer.named_parameters():
        if "lora_" not in n:
            assert p.grad is None and not p.requires_grad, n
    for module in (adapter.vae, adapter.pipe.text_encoder, reward):
        assert all(p.grad is None for p in module.parameters())
    torch.optim.AdamW(params, lr=1e-3).step()
    after = _base_weights(adapter)
    assert all(torch.equal(after[n], base[n]) for n in base)  # base weights bit-identical
    assert any(not torch.equal(p, q) for p, q in zip(params, lora_before))


@pytest.mark.parametrize("method", ["direct-align", "refl", "draft-k", "alignprop", "grpo"])
def test_baselines_train_on_edit_prompts(method, random_world):
    extra = ["grpo.micro_batch=1"] if method == "grpo" else []  # GRPO then slices the edit embeddings
    adapter = _adapter()
    cfg = _cfg(method, extra=extra)
    _, m, params = _setup(cfg, adapter)
    prompts = PROMPTS[: cfg.train.batch_size]
    out = run_step(m, 0, prompts, 5)
    assert np.isfinite(out.loss)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in params)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_exported_lora_and_transformer_reload_into_the_real_pipeline(guidance, tmp_path):
    from directalign.export import export_weights

    images = _images()
    adapter = _adapter(images=images)
    cfg = _cfg()
    _setup(cfg, adapter)
    adapter.transformer.eval()
    paths = export_weights(cfg, adapter, tmp_path / "export")
    steps = 2
    noise = adapter.noise(1, SIDE, SIDE, torch.Generator().manual_seed(3))
    trained = rollout(adapter, adapter.encode_prompts(PROMPTS[:1]), noise, steps, 1.0, guidance, SIDE, SIDE)
    fresh = tiny_qwen_image_edit_pipeline(0)
    base = _pipeline(fresh, images[0], PROMPTS[0], noise, steps, guidance)
    assert (base - trained).abs().max() > 1e-3
    fresh.load_lora_weights(str(paths["lora"]))
    torch.testing.assert_close(_pipeline(fresh, images[0], PROMPTS[0], noise, steps, guidance), trained,
                               rtol=1e-4, atol=1e-4)
    merged = tiny_qwen_image_edit_pipeline(0)
    merged.transformer = type(merged.transformer).from_pretrained(str(paths["transformer"]))
    torch.testing.assert_close(_pipeline(merged, images[0], PROMPTS[0], noise, steps, guidance), trained,
                               rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- manifests and loading
def _write_manifest(folder, prompts, images, fmt="jsonl", name="edits"):
    """A prompt manifest in ``folder`` with the images saved beside it under ``src/`` (relative paths)."""
    (folder / "src").mkdir(parents=True, exist_ok=True)
    rel = []
    for i, im in enumerate(images):
        im.save(folder / "src" / f"{name}{i}.png")
        rel.append(f"src/{name}{i}.png")
    path = folder / f"{name}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"prompt": p, "image": r}) + "\n" for p, r in zip(prompts, rel)))
    else:
        path.write_text("prompt,image\n" + "".join(f"{p},{r}\n" for p, r in zip(prompts, rel)))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_manifest_brings_each_prompts_source_image_to_the_adapter(fmt, tmp_path):
    images = _images(seed=4)
    train = _write_manifest(tmp_path / "train", PROMPTS, images, fmt)
    held = _write_manifest(tmp_path / "held", ["add a hat"], _images(1, seed=5), fmt, "held")
    cfg = _cfg(extra=[f"train.prompts={train}", f"eval.prompts={held}"])
    found = source_images.for_config(cfg, training=True)
    assert found == {PROMPTS[0]: (train.parent / "src/edits0.png").resolve(),
                     PROMPTS[1]: (train.parent / "src/edits1.png").resolve(),
                     "add a hat": (held.parent / "src/held0.png").resolve()}
    assert source_images.for_config(cfg, training=False).keys() == {"add a hat"}
    fresh = QwenImageEditAdapter(tiny_qwen_image_edit_pipeline(0), SEQ)
    source_images.attach(fresh, found)
    direct = _adapter(images=images)  # the same images given as PIL objects
    x = direct.noise(2, SIDE, SIDE, torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = fresh.velocity(x, torch.tensor([0.5]), fresh.encode_prompts(PROMPTS), 1.0, SIDE, SIDE)
        b = direct.velocity(x, torch.tensor([0.5]), direct.encode_prompts(PROMPTS), 1.0, SIDE, SIDE)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert source_images.for_config(_cfg("srpo", "qwen-image", [f"train.prompts={train}"]), True) == {}


def _one_line_error(cfg, *needles):
    with pytest.raises(SourceImageError) as e:
        source_images.for_config(cfg, training=True)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_bad_sources_are_one_line_errors(tmp_path):
    train = _write_manifest(tmp_path, PROMPTS, _images())
    (tmp_path / "src" / "edits1.png").unlink()
    _one_line_error(_cfg(extra=[f"train.prompts={train}"]), "edits1.png", "does not exist", f"{train}:2")
    (tmp_path / "src" / "edits1.png").write_bytes(b"not a png")
    _one_line_error(_cfg(extra=[f"train.prompts={train}"]), "edits1.png", "not a readable image")
    text = tmp_path / "plain.txt"
    text.write_text("make it red\n")
    _one_line_error(_cfg(extra=[f"train.prompts={text}"]), "train.prompts", "make it red", "'image'")
    dup = _write_manifest(tmp_path / "dup", [PROMPTS[0], PROMPTS[0]], _images())
    _one_line_error(_cfg(extra=[f"train.prompts={dup}"]), "one prompt names one image")
    _one_line_error(_cfg(extra=[f"train.prompts={_write_manifest(tmp_path / 'ok', PROMPTS, _images())}"]),
                    "eval.prompts", "tiny-world:heldout")  # the default held-out prompts carry no images


def test_offline_edits_read_the_source_from_the_offline_manifest(tmp_path, random_world):
    images = _images(seed=6)
    train = _write_manifest(tmp_path, PROMPTS, images)
    targets = _images(seed=7)
    lines = []
    for i, (p, t) in enumerate(zip(PROMPTS, targets)):
        t.resize((SIDE, SIDE)).save(tmp_path / f"target{i}.png")
        lines.append(json.dumps({"image": f"target{i}.png", "caption": p, "source": f"src/edits{i}.png"}))
    offline = tmp_path / "offline.jsonl"
    offline.write_text("\n".join(lines) + "\n")
    cfg = _cfg(extra=[f"train.prompts={train}", f"eval.prompts={train}", f"srpo.offline_data={offline}"])
    found = source_images.for_config(cfg, training=True)
    assert found[PROMPTS[1]] == (tmp_path / "src/edits1.png").resolve()
    adapter = QwenImageEditAdapter(tiny_qwen_image_edit_pipeline(0), SEQ)
    source_images.attach(adapter, found)
    _, method, params = _setup(cfg, adapter)
    out = run_step(method, 0, PROMPTS, 3)
    assert np.isfinite(out.loss) and method.nfe(2)["nfe_no_grad"] == 0  # offline: no rollout
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in params)
    offline.write_text(json.dumps({"image": "target0.png", "caption": PROMPTS[0]}) + "\n")
    _one_line_error(cfg, "srpo.offline_data", '"source"')


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit") / "qwen-image-edit"
    tiny_qwen_image_edit_pipeline(0).save_pretrained(root)
    return root


def test_load_adapter_loads_a_saved_edit_pipeline(saved_dir, tmp_path):
    assert family_of_dir(saved_dir) == "qwen-image-edit"
    cfg = build_config({}, ["model.family=qwen-image-edit", f"model.path={saved_dir}", "model.device=cpu",
                            f"model.height={SIDE}", f"model.width={SIDE}", f"model.max_sequence_length={SEQ}"])
    adapter = load_adapter(cfg.model, torch.device("cpu"), DTYPES["float32"])
    assert type(adapter) is QwenImageEditAdapter and FAMILIES["qwen-image-edit"].pipeline == "QwenImageEditPipeline"
    images = _images(seed=8)
    adapter.set_source_images(dict(zip(PROMPTS, images)))
    ref = _adapter(images=images)
    x = ref.noise(2, SIDE, SIDE, torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = adapter.velocity(x, torch.tensor([0.5]), adapter.encode_prompts(PROMPTS), 4.0, SIDE, SIDE)
        b = ref.velocity(x, torch.tensor([0.5]), ref.encode_prompts(PROMPTS), 4.0, SIDE, SIDE)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    wrong = build_config({}, ["model.family=qwen-image", f"model.path={saved_dir}", "model.device=cpu"])
    from directalign.errors import TrainingError

    with pytest.raises(TrainingError, match="set model.family=qwen-image-edit"):
        load_adapter(wrong.model, torch.device("cpu"), DTYPES["float32"])
    broken = tmp_path / "broken"
    shutil.copytree(saved_dir, broken)
    shutil.rmtree(broken / "processor")
    cfg.model.path = str(broken)
    with pytest.raises(TrainingError, match=r"QwenImageEditPipeline: .* missing what an edit pipeline needs: processor"):
        load_adapter(cfg.model, torch.device("cpu"), DTYPES["float32"])


def test_load_adapter_loads_a_saved_edit_plus_pipeline(tmp_path):
    tiny_qwen_image_edit_pipeline(0, plus=True).save_pretrained(tmp_path / "plus")
    assert family_of_dir(tmp_path / "plus") == "qwen-image-edit-plus"
    cfg = build_config({}, ["model.family=qwen-image-edit-plus", f"model.path={tmp_path / 'plus'}",
                            "model.device=cpu", f"model.max_sequence_length={SEQ}"])
    adapter = load_adapter(cfg.model, torch.device("cpu"), DTYPES["float32"])
    assert type(adapter) is QwenImageEditPlusAdapter and type(adapter.pipe).__name__ == "QwenImageEditPlusPipeline"
    images = _images(seed=12)
    adapter.set_source_images(dict(zip(PROMPTS, images)))
    noise = adapter.noise(1, SIDE, SIDE, torch.Generator().manual_seed(0))
    ours = rollout(adapter, adapter.encode_prompts(PROMPTS[:1]), noise, 2, 1.0, 4.0, SIDE, SIDE)
    torch.testing.assert_close(ours, _pipeline(adapter.pipe, images[0], PROMPTS[0], noise, 2, 4.0), rtol=0, atol=2e-5)


def test_eval_load_model_attaches_the_held_out_sources(saved_dir, tmp_path):
    from directalign.eval.models import load_model, resolve_model

    held = _write_manifest(tmp_path, PROMPTS, _images(seed=9))
    cfg = build_config({}, ["model.device=cpu", f"model.height={SIDE}", f"model.width={SIDE}",
                            f"model.max_sequence_length={SEQ}", f"eval.prompts={held}"])
    adapter = load_model(resolve_model(str(saved_dir), cfg), cfg)  # the family comes from model_index.json
    assert isinstance(adapter, QwenImageEditAdapter)
    assert [adapter.source_key(p) for p in PROMPTS] == [str((tmp_path / f"src/edits{i}.png").resolve())
                                                        for i in range(2)]
    assert adapter.encode_prompts(PROMPTS).text.tokens.shape[0] == 2


def test_two_training_steps_end_to_end_on_edit_manifests(saved_dir, random_world, tmp_path):
    from directalign.training import train

    train_m = _write_manifest(tmp_path / "train", PROMPTS, _images(seed=10))
    held = _write_manifest(tmp_path / "held", ["add a hat", "remove the hat"], _images(seed=11), name="held")
    cfg = tiny_config("srpo", "model.family=qwen-image-edit", f"model.path={saved_dir}", "model.device=cpu",
                      f"model.height={SIDE}", f"model.width={SIDE}", f"model.max_sequence_length={SEQ}",
                      "train.steps=2", "srpo.rollout_guidance=2.0", "eval.before=true", f"train.prompts={train_m}",
                      f"eval.prompts={held}", run_dir=tmp_path / "run")
    result = train(cfg, log=lambda *_: None)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert np.isfinite(summary["reward_before"]) and np.isfinite(summary["reward_after"])
    assert len((result.run_dir / "metrics.jsonl").read_text().splitlines()) == 2
    assert any((result.run_dir / "export").rglob("pytorch_lora_weights.safetensors"))


def test_the_shipped_edit_config_loads_and_validates():
    from directalign.config import load_config, packaged_config, validate

    cfg = load_config(packaged_config("qwen-image-edit-srpo-pickscore"))
    validate(cfg)
    s = cfg.srpo
    assert (cfg.method, cfg.model.family, cfg.reward.kind) == ("srpo", "qwen-image-edit", "pickscore")
    assert (s.window, cfg.sampling.shift, s.groundtruth_ratio, s.grid_points) == ([5, 40], 1.0, 0.6, 100)
    assert (s.rollout_guidance, s.train_guidance, cfg.eval.steps, cfg.eval.guidance) == (4.0, 1.0, 50, 4.0)
    assert cfg.model.height % 16 == 0 and cfg.train.prompts.endswith(".jsonl")
    assert cfg.model.max_sequence_length == 512


def test_fsdp_block_names_cover_every_transformer_block():
    adapter = _adapter()
    blocks = [m for name in adapter.fsdp_block_names for m in getattr(adapter.transformer, name)]
    assert len(blocks) == adapter.transformer.config.num_layers
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    outside = [n for n, p in adapter.transformer.named_parameters() if id(p) not in in_blocks]
    assert outside and all(not n.startswith("transformer_blocks.") for n in outside)  # the root's own layers


def test_gradient_checkpointing_gives_the_same_gradients_on_edits(random_world):
    grads = []
    for on in (False, True):
        adapter = _adapter()
        cfg = _cfg(extra=[f"train.gradient_checkpointing={str(on).lower()}", "srpo.train_guidance=2.0"])
        _, method, _ = _setup(cfg, adapter)
        assert adapter.transformer.gradient_checkpointing is on
        run_step(method, 1, PROMPTS, 9)
        grads.append({n: p.grad.clone() for n, p in adapter.transformer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7, msg=n)
