"""The training engine on the random-weight tiny world: what changes, exact resume, atomic checkpoints, non-finite
steps, resume checks, export and offline mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_config

from directalign import data as data_mod
from directalign import training as training_mod
from directalign.engine import checkpoint as ckpt
from directalign.errors import TrainingError, UserError
from directalign.logging_utils import read_metrics
from directalign.training import train


def _cfg(run_dir, *extra):
    return tiny_config("srpo", "run.report=true", *extra, run_dir=run_dir)


def _quiet(*_a, **_k):
    pass


def _fresh_pipe(world: Path):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(world / "generator", local_files_only=True)


def _fresh_reward_state(world: Path):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(world / "reward").state_dict()


def _assert_same_state(a: dict, b: dict, label: str):
    assert set(a) == set(b), f"{label}: different keys"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{label}.{k} changed"


def _capture_reward(monkeypatch):
    box = {}
    orig = training_mod.load_reward

    def wrapped(*a, **k):
        box["reward"] = orig(*a, **k)
        return box["reward"]

    monkeypatch.setattr(training_mod, "load_reward", wrapped)
    return box


def _base_weights_of_lora_model(transformer) -> dict:
    """The base transformer's weights under their original names (peft wraps them in ``base_layer``)."""
    out = {}
    for n, t in transformer.state_dict().items():
        if "lora_" in n:
            continue
        out[n.replace(".base_layer.", ".")] = t
    return out


def _ckpt_tensors(run_dir: Path, step: int) -> dict:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors"))


# ------------------------------------------------------------------------------------------------------ (a)
def test_lora_changes_only_lora_weights(random_world, tmp_path, monkeypatch):
    box = _capture_reward(monkeypatch)
    run = tmp_path / "run"
    cfg = _cfg(run, "train.steps=2", "train.finetune=lora", "run.checkpoint_every=1")
    result = train(cfg, max_steps_this_session=2, log=_quiet)
    fresh = _fresh_pipe(random_world)
    trained = result.adapter.pipe

    # LoRA weights: B starts at zero and moves; every LoRA tensor changes on step 2
    s1, s2 = _ckpt_tensors(run, 1), _ckpt_tensors(run, 2)
    assert s1 and set(s1) == set(s2)
    assert all("lora_" in k for k in s2)
    for k in s2:
        assert not torch.equal(s1[k], s2[k]), f"{k} did not change on step 2"
        if "lora_B" in k:
            assert s2[k].abs().max() > 0, f"{k} is still zero"

    base = _base_weights_of_lora_model(trained.transformer)
    _assert_same_state(base, fresh.transformer.state_dict(), "transformer")
    _assert_same_state(trained.vae.state_dict(), fresh.vae.state_dict(), "vae")
    _assert_same_state(trained.text_encoder.state_dict(), fresh.text_encoder.state_dict(), "text_encoder")
    _assert_same_state(trained.text_encoder_2.state_dict(), fresh.text_encoder_2.state_dict(), "text_encoder_2")
    _assert_same_state(box["reward"].model.state_dict(), _fresh_reward_state(random_world), "reward")


def test_full_finetune_changes_transformer_only(random_world, tmp_path, monkeypatch):
    box = _capture_reward(monkeypatch)
    cfg = _cfg(tmp_path / "run", "train.steps=2", "train.finetune=full")
    result = train(cfg, max_steps_this_session=2, log=_quiet)
    fresh = _fresh_pipe(random_world)
    trained = result.adapter.pipe
    new, old = trained.transformer.state_dict(), fresh.transformer.state_dict()
    assert set(new) == set(old)
    changed = [k for k in new if not torch.equal(new[k], old[k])]
    assert len(changed) >= 0.9 * len(new), f"only {len(changed)}/{len(new)} transformer tensors changed"
    assert "proj_out.weight" in changed
    _assert_same_state(trained.vae.state_dict(), fresh.vae.state_dict(), "vae")
    _assert_same_state(trained.text_encoder.state_dict(), fresh.text_encoder.state_dict(), "text_encoder")
    _assert_same_state(trained.text_encoder_2.state_dict(), fresh.text_encoder_2.state_dict(), "text_encoder_2")
    _assert_same_state(box["reward"].model.state_dict(), _fresh_reward_state(random_world), "reward")


# ------------------------------------------------------------------------------------------------------ (b)
def _optimizer_equal(a: dict, b: dict):
    assert a["param_groups"] == b["param_groups"]
    assert set(a["state"]) == set(b["state"])
    for i in a["state"]:
        sa, sb = a["state"][i], b["state"][i]
        assert set(sa) == set(sb)
        for k in sa:
            va, vb = sa[k], sb[k]
            if torch.is_tensor(va):
                assert torch.equal(va, vb), f"optimizer state {i}.{k} differs"
            else:
                assert va == vb


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_resume_is_bit_exact(random_world, tmp_path, finetune):
    extra = ["train.steps=4", f"train.finetune={finetune}", "run.checkpoint_every=2", "train.ema_decay=0.5"]
    a, b = tmp_path / "straight", tmp_path / "resumed"
    train(_cfg(a, *extra), log=_quiet, max_steps_this_session=4)
    first = train(_cfg(b, *extra), log=_quiet, max_steps_this_session=2)
    assert first.summary == {"step": 2}
    assert ckpt.latest_checkpoint(b / "checkpoints").name == "step-00000002"
    train(_cfg(b, *extra), resume=True, log=_quiet, max_steps_this_session=2)

    ta, tb = _ckpt_tensors(a, 4), _ckpt_tensors(b, 4)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs after resume"
    # and the run did move away from step 2
    t2 = _ckpt_tensors(b, 2)
    assert any(not torch.equal(t2[k], tb[k]) for k in tb)
    for name in ("ema.safetensors",):
        ea = load_file(str(a / "checkpoints" / "step-00000004" / name))
        eb = load_file(str(b / "checkpoints" / "step-00000004" / name))
        for k in ea:
            assert torch.equal(ea[k], eb[k]), f"EMA {k} differs after resume"
    oa = torch.load(a / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)
    ob = torch.load(b / "checkpoints" / "step-00000004" / "optimizer.pt", weights_only=True)
    _optimizer_equal(oa, ob)
    sa = json.loads((a / "checkpoints" / "step-00000004" / "state.json").read_text())
    sb = json.loads((b / "checkpoints" / "step-00000004" / "state.json").read_text())
    assert sa == sb
    # the resumed run's metrics continue the first session's
    assert [r["step"] for r in read_metrics(b)] == [1, 2, 3, 4]
    la = [(r["step"], r["loss"]) for r in read_metrics(a)]
    lb = [(r["step"], r["loss"]) for r in read_metrics(b)]
    assert la == lb


# ------------------------------------------------------------------------------------------------------ (c)
def test_checkpoint_crash_keeps_previous(random_world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    calls = {"n": 0}
    real = ckpt.save_file

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            real(tensors, path, *a, **k)  # a partial file lands in the temporary directory
            raise OSError(28, "No space left on device")
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    cfg = _cfg(run, "train.steps=2", "run.checkpoint_every=1")
    with pytest.raises(ckpt.CheckpointError, match="step-00000002"):
        train(cfg, log=_quiet)
    assert calls["n"] == 2
    root = run / "checkpoints"
    steps = sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))
    assert steps == ["step-00000001"]
    for p in root.iterdir():
        if p.name.startswith("step-"):
            assert (p / "state.json").is_file(), f"{p.name} has no state.json"
    assert not list(root.glob(".tmp-*")), "the failed save left its temporary directory"
    latest = ckpt.latest_checkpoint(root)
    assert latest.name == "step-00000001"
    loaded = ckpt.load_checkpoint(latest)
    assert loaded["state"]["step"] == 1 and loaded["trainable"]

    # a crash mid-save leaves a .tmp-* directory (even one holding state.json): never picked up
    leftover = root / ".tmp-step-00000009-999"
    shutil.copytree(latest, leftover)
    assert ckpt.latest_checkpoint(root).name == "step-00000001"
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-00000001"]
    # a step directory without state.json (never finished) is ignored too
    (root / "step-00000010").mkdir()
    assert ckpt.latest_checkpoint(root).name == "step-00000001"
    with pytest.raises(ckpt.CheckpointError, match="state.json"):
        ckpt.load_checkpoint(root / "step-00000010")

    # resuming from the surviving checkpoint finishes the run (and the next save clears the leftover)
    monkeypatch.setattr(ckpt, "save_file", real)
    cfg_done = _cfg(run, "train.steps=2", "run.checkpoint_every=1", "eval.prompts=tiny-world:heldout")
    monkeypatch.setattr(training_mod, "finish", lambda *a, **k: {})
    train(cfg_done, resume=True, log=_quiet)
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    assert not leftover.exists()


def _dummy_optimizer():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def test_keep_checkpoints_prunes_but_keeps_newest(tmp_path):
    opt, sched = _dummy_optimizer()
    root = tmp_path / "ck"
    for step in range(1, 6):
        ckpt.save_checkpoint(root, step, {"w": torch.full((2,), float(step))}, opt, sched, {}, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-00000004", "step-00000005"]
    ckpt.save_checkpoint(root, 6, {"w": torch.zeros(2)}, opt, sched, {}, keep=1)
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-00000006"]
    # re-saving an older step (keep=1) keeps the newest complete checkpoint and the one just written
    ckpt.save_checkpoint(root, 3, {"w": torch.zeros(2)}, opt, sched, {}, keep=1)
    names = [p.name for p in ckpt.checkpoint_dirs(root)]
    assert "step-00000006" in names and "step-00000003" in names
    # re-saving the same step replaces it atomically
    ckpt.save_checkpoint(root, 6, {"w": torch.full((2,), 7.0)}, opt, sched, {}, keep=2)
    assert torch.equal(ckpt.load_checkpoint(root / "step-00000006")["trainable"]["w"], torch.full((2,), 7.0))
    assert not list(root.glob(".tmp-*"))


def test_save_checkpoint_refuses_non_finite(tmp_path):
    opt, sched = _dummy_optimizer()
    root = tmp_path / "ck"
    ckpt.save_checkpoint(root, 1, {"w": torch.ones(2)}, opt, sched, {})
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(ckpt.CheckpointError, match="non-finite"):
            ckpt.save_checkpoint(root, 2, {"w": torch.tensor([1.0, bad])}, opt, sched, {})
    with pytest.raises(ckpt.CheckpointError, match="non-finite"):
        ckpt.save_checkpoint(root, 2, {"w": torch.ones(2)}, opt, sched, {}, ema={"w": torch.tensor([float("nan")])})
    assert [p.name for p in root.iterdir()] == ["step-00000001"]
    assert torch.equal(ckpt.load_checkpoint(root / "step-00000001")["trainable"]["w"], torch.ones(2))


# ------------------------------------------------------------------------------------------------------ (d)
def _nan_reward_on_step(monkeypatch, bad_step: int):
    from directalign.methods import srpo as srpo_mod

    box = _capture_reward(monkeypatch)
    current = {"step": None}
    orig = srpo_mod.SRPO.train_step

    def tracking(self, ctx, *a, **k):
        current["step"] = ctx.step
        if "patched" not in box:
            box["patched"] = True
            reward = box["reward"]
            real_score = reward.score_texts

            def score(state, texts):
                out = real_score(state, texts)
                return out * float("nan") if current["step"] == bad_step else out

            reward.score_texts = score
        return orig(self, ctx, *a, **k)

    monkeypatch.setattr(srpo_mod.SRPO, "train_step", tracking)


def test_nonfinite_step_is_skipped(random_world, tmp_path, monkeypatch):
    _nan_reward_on_step(monkeypatch, bad_step=1)  # the second step (logged as step 2)
    run = tmp_path / "run"
    cfg = _cfg(run, "train.steps=3", "run.checkpoint_every=1", "run.keep_checkpoints=5", "train.ema_decay=0.5")
    train(cfg, log=_quiet, max_steps_this_session=3)
    records = read_metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert [r["skipped"] for r in records] == [False, True, False]
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in metrics.jsonl"))
              for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert strict[1]["loss"] is None  # the skipped step's NaN, as JSON null
    s1, s2, s3 = (_ckpt_tensors(run, i) for i in (1, 2, 3))
    for k in s1:
        assert torch.equal(s1[k], s2[k]), f"{k} changed on the skipped step"
    assert any(not torch.equal(s2[k], s3[k]) for k in s3), "the step after the skipped one did not train"
    for t in s3.values():
        assert torch.isfinite(t).all()
    o1 = torch.load(run / "checkpoints" / "step-00000001" / "optimizer.pt", weights_only=True)
    o2 = torch.load(run / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=True)
    for i in o1["state"]:
        for k, v in o1["state"][i].items():
            assert torch.equal(v, o2["state"][i][k]), "optimizer state changed on the skipped step"
    e1 = load_file(str(run / "checkpoints" / "step-00000001" / "ema.safetensors"))
    e2 = load_file(str(run / "checkpoints" / "step-00000002" / "ema.safetensors"))
    assert all(torch.equal(e1[k], e2[k]) for k in e1), "EMA moved on the skipped step"


def test_nonfinite_step_aborts_when_asked(random_world, tmp_path, monkeypatch):
    _nan_reward_on_step(monkeypatch, bad_step=0)
    cfg = _cfg(tmp_path / "run", "train.steps=2", "train.on_nonfinite=abort")
    with pytest.raises(TrainingError, match="non-finite"):
        train(cfg, log=_quiet, max_steps_this_session=2)


# ------------------------------------------------------------------------------------------------------ (e)
def _make_world(root: Path, reward_from: Path, seed: int, **transformer_changes) -> Path:
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from directalign.world import architecture as arch

    torch.manual_seed(seed)
    comps = arch.new_generator_components()
    if transformer_changes:
        comps["transformer"] = FluxTransformer2DModel(**dict(arch.TRANSFORMER_CONFIG, **transformer_changes))
    FluxPipeline(**comps).save_pretrained(root / "generator")
    shutil.copytree(reward_from / "reward", root / "reward")
    return root


@pytest.fixture(scope="module")
def other_worlds(random_world_dir, tmp_path_factory):
    """Two other generators with the same reward: same architecture with other weights, and one single block fewer."""
    return {
        "weights": _make_world(tmp_path_factory.mktemp("other-weights"), random_world_dir, seed=1),
        "architecture": _make_world(tmp_path_factory.mktemp("other-arch"), random_world_dir, seed=0,
                                    num_single_layers=3),
    }


def test_resume_refuses_changed_config_or_model(random_world, random_world_dir, other_worlds, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(_cfg(run, "train.steps=4"), log=_quiet, max_steps_this_session=1)
    with pytest.raises(TrainingError, match="different config"):
        train(_cfg(run, "train.steps=4", "train.learning_rate=2e-3"), resume=True, log=_quiet)
    with pytest.raises(TrainingError, match="different config"):
        train(_cfg(run, "train.steps=4", "srpo.window=[5,20]"), resume=True, log=_quiet)
    # the same weights under another path (a moved model folder) are the same model: resume is allowed
    moved = train(_cfg(run, "train.steps=4", f"model.path={random_world_dir / 'generator'}"), resume=True,
                  log=_quiet, max_steps_this_session=0)
    assert moved.summary == {"step": 1}
    # a different model under the same config (model.path=tiny-world points elsewhere)
    for kind, world in other_worlds.items():
        monkeypatch.setenv("DIRECTALIGN_WORLD_DIR", str(world))
        with pytest.raises(TrainingError, match="different model"):
            train(_cfg(run, "train.steps=4"), resume=True, log=_quiet)
    monkeypatch.setenv("DIRECTALIGN_WORLD_DIR", str(random_world_dir))
    # changing only the step budget or the logging is allowed
    out = train(_cfg(run, "train.steps=5", "run.log_every=2"), resume=True, log=_quiet, max_steps_this_session=1)
    assert out.summary == {"step": 2}


def test_existing_run_dir_needs_resume_or_overwrite(random_world, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "something.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        train(_cfg(run, "train.steps=1"), log=_quiet)
    assert (run / "something.txt").read_text() == "x"  # untouched
    with pytest.raises(UserError, match="not a directalign run"):  # --overwrite replaces only a run directory
        train(_cfg(run, "train.steps=1"), overwrite=True, log=_quiet)
    assert (run / "something.txt").read_text() == "x"
    with pytest.raises(UserError, match="resume"):
        train(_cfg(tmp_path / "nothing", "train.steps=1"), resume=True, log=_quiet)
    # a run directory (an earlier run's own files) is replaced
    (run / "config.yaml").write_text("method: srpo\n")
    (run / "metrics.jsonl").write_text("")
    out = train(_cfg(run, "train.steps=2"), overwrite=True, log=_quiet, max_steps_this_session=1)
    assert not (run / "something.txt").exists()
    assert out.summary == {"step": 1}


# ------------------------------------------------------------------------------------------------------ (f)
def _velocity(transformer, adapter):
    g = torch.Generator().manual_seed(123)
    h = w = 32
    x = adapter.noise(2, h, w, g)
    embeds = adapter.encode_prompts(["a red circle on a blue background", "a green cross on a white background"])
    txt_ids = torch.zeros(embeds.tokens.shape[1], 3)
    with torch.no_grad():
        return transformer(hidden_states=x, timestep=torch.tensor([0.8, 0.3]), guidance=torch.tensor([3.5, 3.5]),
                           pooled_projections=embeds.pooled, encoder_hidden_states=embeds.tokens, txt_ids=txt_ids,
                           img_ids=adapter._image_ids(h, w), return_dict=False)[0]


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_export_reproduces_trained_velocity(random_world, tmp_path, finetune):
    from diffusers import FluxPipeline, FluxTransformer2DModel

    run = tmp_path / "run"
    cfg = _cfg(run, "train.steps=2", f"train.finetune={finetune}", "train.learning_rate=1e-2")
    result = train(cfg, log=_quiet)
    assert "reward_after" in result.summary
    adapter = result.adapter
    v_trained = _velocity(adapter.transformer, adapter)
    v_base = _velocity(_fresh_pipe(random_world).transformer, adapter)
    assert (v_trained - v_base).abs().max() > 1e-2, "training did not change the velocity; the test is vacuous"

    merged = FluxTransformer2DModel.from_pretrained(run / "export" / "transformer")
    torch.testing.assert_close(_velocity(merged, adapter), v_trained, rtol=0, atol=1e-4)
    if finetune == "lora":
        assert (run / "export" / "lora" / "pytorch_lora_weights.safetensors").is_file()
        pipe = FluxPipeline.from_pretrained(random_world / "generator", local_files_only=True)
        pipe.load_lora_weights(run / "export" / "lora")
        torch.testing.assert_close(_velocity(pipe.transformer, adapter), v_trained, rtol=0, atol=1e-4)
    else:
        assert not (run / "export" / "lora").exists()


# ------------------------------------------------------------------------------------------------------ (g)
def _write_offline_folder(folder: Path, n: int = 4) -> list[str]:
    from PIL import Image

    from directalign.world import dataset as ds

    folder.mkdir()
    captions = []
    for i, ex in enumerate(ds.sample_examples(n, seed=3)):
        img = ds.render(ex.attrs)
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        Image.fromarray(arr).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(ex.caption + "\n", encoding="utf-8")
        captions.append(ex.caption)
    return captions


def test_offline_mode_trains_on_captions(random_world, tmp_path, monkeypatch):
    from directalign.methods import srpo as srpo_mod

    captions = _write_offline_folder(tmp_path / "data")
    seen = []
    orig = srpo_mod.SRPO.step_inputs
    rollouts = []
    orig_clean = srpo_mod.SRPO.clean_latents

    def spy(self, ctx):
        prompts, x0, noise, fresh = orig(self, ctx)
        seen.append((list(prompts), x0 is not None, noise is not None))
        return prompts, x0, noise, fresh

    def spy_clean(self, *a, **k):
        rollouts.append(1)
        return orig_clean(self, *a, **k)

    monkeypatch.setattr(srpo_mod.SRPO, "step_inputs", spy)
    monkeypatch.setattr(srpo_mod.SRPO, "clean_latents", spy_clean)
    run = tmp_path / "run"
    cfg = _cfg(run, "train.steps=2", f"srpo.offline_data={tmp_path / 'data'}")
    train(cfg, log=_quiet, max_steps_this_session=2)
    assert len(seen) == 2
    used = [p for prompts, _, _ in seen for p in prompts]
    assert len(used) == 4 and set(used) <= set(captions)
    assert sorted(used) == sorted(captions)  # batch 2 x 2 steps = one epoch over the 4 images
    assert all(has_x0 and has_noise for _, has_x0, has_noise in seen)
    assert not rollouts, "offline mode ran a rollout"
    assert not any(r["skipped"] for r in read_metrics(run))


def test_offline_x0_is_the_encoded_image(random_world, tmp_path, monkeypatch):
    """The x0 handed to the method is the VAE encoding of the captioned image."""
    from directalign.methods import srpo as srpo_mod

    _write_offline_folder(tmp_path / "data")
    offline = data_mod.load_offline(str(tmp_path / "data"), 32, 32)
    got = []
    orig = srpo_mod.SRPO.step_inputs

    def spy(self, ctx):
        prompts, x0, noise, fresh = orig(self, ctx)
        idx = [offline.captions.index(p) for p in prompts]
        got.append(torch.allclose(x0, self.adapter.encode_images(offline.images[idx]), atol=1e-6))
        return prompts, x0, noise, fresh

    monkeypatch.setattr(srpo_mod.SRPO, "step_inputs", spy)
    train(_cfg(tmp_path / "run", "train.steps=1", f"srpo.offline_data={tmp_path / 'data'}"), log=_quiet,
          max_steps_this_session=1)
    assert got == [True]


def test_offline_bad_data_names_the_file(random_world, tmp_path):
    folder = tmp_path / "data"
    _write_offline_folder(folder)
    (folder / "img2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(data_mod.DataError, match="img2.png"):
        data_mod.load_offline(str(folder), 32, 32)
    # the run stops on it too, before the run directory is created
    run = tmp_path / "run"
    with pytest.raises(data_mod.DataError, match="img2.png"):
        train(_cfg(run, "train.steps=1", f"srpo.offline_data={folder}"), log=_quiet)
    assert not run.exists()

    folder2 = tmp_path / "data2"
    _write_offline_folder(folder2)
    (folder2 / "img1.txt").unlink()
    with pytest.raises(data_mod.DataError, match="img1"):
        data_mod.load_offline(str(folder2), 32, 32)

    folder3 = tmp_path / "data3"
    _write_offline_folder(folder3)
    (folder3 / "img0.png").write_bytes((folder3 / "img0.png").read_bytes()[:60])  # truncated
    with pytest.raises(data_mod.DataError, match="img0.png"):
        data_mod.load_offline(str(folder3), 32, 32)


# ------------------------------------------------------------------------------------------------------ issue 16
# Items 4-7 and 13: resume against the run's recorded state, float16 on the CPU, the summary of a base model that was
# not measured, where the report is.
def _cli_sets(run_dir: Path, *extra: str) -> list[str]:
    from helpers import CHEAP, COMMON

    out = []
    for s in COMMON + CHEAP["srpo"] + [f"run.output_dir={run_dir}", *extra]:
        out += ["--set", s]
    return out


def _files(root: Path) -> dict:
    """Every file under ``root`` (but the lock file) with its size, mtime and content: what "nothing changed" means."""
    from directalign.engine.rundir import LOCK_FILE

    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != LOCK_FILE}


def _no_model_loads(monkeypatch):
    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(training_mod, "load_adapter", refuse)


def test_finished_run_summary_and_resume_of_it(random_world, tmp_path, monkeypatch, capsys):
    """Item 7: with eval.before=false the summary says "not measured (eval.before=false)", never nan; item 13: it
    says where report.html is; item 5: --resume of the finished run says it is complete, loads nothing, changes
    nothing and exits 0 (bare --resume and --resume RUN_DIR alike)."""
    from directalign.cli import main

    run = tmp_path / "run"
    assert main(["train", *_cli_sets(run, "train.steps=1", "run.report=true")]) == 0
    out, _ = capsys.readouterr()
    assert "held-out reward: before not measured (eval.before=false)  after " in out
    assert "nan" not in out.lower()
    assert "  fg              not measured -> " in out  # the judge rates too
    assert f"report: {run / 'report.html'}" in out and (run / "report.html").is_file()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["before_not_measured"] == "eval.before=false" and "reward_before" not in summary
    assert summary["step"] == 1

    before = _files(run)
    _no_model_loads(monkeypatch)
    for argv in (["train", *_cli_sets(run, "train.steps=1", "run.report=true"), "--resume"],
                 ["train", "--resume", str(run)]):
        assert main(argv) == 0
        out, err = capsys.readouterr()
        assert f"run {run} is already complete" in out and "nothing was done" in out, out
        assert f"see {run / 'report.html'}" in out and "directalign eval --model" in out
        assert "held-out reward: before not measured (eval.before=false)" in out
        assert "done:" not in out and "error" not in err
        assert _files(run) == before, "resuming a finished run changed its files"


def test_resume_refuses_a_shorter_or_respanned_schedule(random_world, tmp_path, monkeypatch, capsys):
    """Item 4: train.steps below the newest checkpoint's step is refused (one line, before any model loads, nothing
    changed) instead of exporting the longer run under a shorter config.yaml; under a decaying LR schedule, which
    spans train.steps, another train.steps is refused too; the same train.steps continues."""
    from directalign.cli import main

    run = tmp_path / "run"
    extra = ("train.lr_schedule=cosine",)
    train(_cfg(run, "train.steps=3", *extra), log=_quiet, max_steps_this_session=2)
    assert json.loads((run / "checkpoints" / "step-00000002" / "state.json").read_text())["train_steps"] == 3
    before = _files(run)
    with monkeypatch.context() as m:
        _no_model_loads(m)
        with pytest.raises(TrainingError, match=r"newest checkpoint is at step 2, past train.steps=1; set "
                                                r"train.steps to 2 or more"):
            train(_cfg(run, "train.steps=1", *extra), resume=True, log=_quiet)
        with pytest.raises(TrainingError, match=r"lr_schedule=cosine decays over train.steps.*keep train.steps=3"):
            train(_cfg(run, "train.steps=4", *extra), resume=True, log=_quiet)
        code = main(["train", "--resume", str(run), "--set", "train.steps=1"])
        out, err = capsys.readouterr()
        assert code == 2 and "Traceback" not in out + err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("directalign: error: --resume: the run's newest checkpoint "
                                                       "is at step 2, past train.steps=1"), err
    assert _files(run) == before
    out = train(_cfg(run, "train.steps=3", *extra), resume=True, log=_quiet, max_steps_this_session=0)
    assert out.summary == {"step": 2} and not out.already_complete


@pytest.mark.slow  # five model loads and three evaluations: ~25 s (tests/test_run_state.py has the fast checks)
def test_resume_with_other_eval_seeds_never_compares_across_seeds(random_world, tmp_path):
    """Item 4: summary_before.json records the eval settings of the base evaluation; a resume with other eval.seeds
    evaluates the base model again on them (and says so), or with eval.before=false reports the base model as not
    measured, naming what changed."""
    run, prompts = tmp_path / "run", tmp_path / "heldout.txt"
    prompts.write_text("a red circle on a blue background\na green cross on a white background\n", encoding="utf-8")
    base = ("train.steps=2", "eval.before=true", f"eval.prompts={prompts}")
    train(_cfg(run, *base, "eval.seeds=[0]"), log=_quiet, max_steps_this_session=1)
    first = json.loads((run / "summary_before.json").read_text())
    assert first["eval_before"]["seeds"] == [0] and first["eval_before"]["prompts"] == str(prompts)
    assert first["eval_before"]["prompt_count"] == 2

    logged = []
    train(_cfg(run, *base, "eval.seeds=[1]"), resume=True, log=logged.append, max_steps_this_session=0)
    second = json.loads((run / "summary_before.json").read_text())
    assert second["eval_before"]["seeds"] == [1]
    assert second["reward_before"] != first["reward_before"]  # measured again, on the other seed
    assert any("eval.seeds [0] -> [1]" in m and "evaluating the base model again" in m for m in logged), logged

    stamp = (run / "summary_before.json").stat().st_mtime_ns  # the same settings: the record is kept as it is
    train(_cfg(run, *base, "eval.seeds=[1]"), resume=True, log=_quiet, max_steps_this_session=0)
    assert (run / "summary_before.json").stat().st_mtime_ns == stamp

    logged.clear()
    done = train(_cfg(run, *base, "eval.before=false", "eval.seeds=[0]"), resume=True, log=logged.append)
    s = done.summary
    assert "reward_before" not in s and "judge_before" not in s and s["eval_seeds"] == [0]
    assert "eval.seeds [1] -> [0]" in s["before_not_measured"] and "eval.before=false" in s["before_not_measured"]
    assert any("reports the base model as not measured" in m for m in logged), logged


def test_summary_lines_say_not_measured_and_why():
    from directalign.cli.train import log_results

    lines = []
    log_results({"reward_after": 0.5, "judge_after": {"fg": 1.0}, "before_not_measured": "eval.before=false",
                 "reward_best_of_4": None}, lines.append)
    assert lines == ["held-out reward: before not measured (eval.before=false)  after 0.5000",
                     "  fg              not measured -> 1.000"]
    lines.clear()
    log_results({"reward_before": 0.25, "reward_best_of_4": 0.375, "reward_after": 0.5,
                 "judge_before": {"fg": 0.5}, "judge_after": {"fg": 1.0}, "report": "r/report.html"}, lines.append)
    assert lines == ["held-out reward: before 0.2500  best-of-4 0.3750  after 0.5000",
                     "  fg              0.500 -> 1.000", "report: r/report.html"]


@pytest.mark.slow  # float16 computes several times slower than float32 on the CPU: ~40 s
def test_float16_on_cpu_trains_like_float32(random_world, tmp_path):
    """Item 6: model.dtype=float16 on the CPU used to turn the weights into NaN after one step (AdamW on float16
    weights). With float32 master weights it trains: every step finite, not skipped, the weights float32 and within
    a percent of the float32 run's loss, so float16 is not refused on the CPU; the log says it is slower there."""
    runs = {}
    for dtype in ("float32", "float16"):
        run, logged = tmp_path / dtype, []
        train(_cfg(run, "train.steps=3", f"model.dtype={dtype}"), log=logged.append, max_steps_this_session=2)
        assert any("model.dtype=float16 on the CPU" in m for m in logged) == (dtype == "float16")
        runs[dtype] = read_metrics(run)
        weights = _ckpt_tensors(run, 2)
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in weights.values())
    half, full = runs["float16"], runs["float32"]
    assert [r["skipped"] for r in half] == [False, False]
    for a, b in zip(half, full):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-2)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=0.1)


def test_non_finite_weights_message_is_true(tmp_path):
    """Item 6: "the previous checkpoint is kept" only when there is one."""
    opt, sched = _dummy_optimizer()
    root = tmp_path / "ck"
    bad = {"w": torch.tensor([1.0, float("nan")])}
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint of this run exists yet, so none is kept") as e:
        ckpt.save_checkpoint(root, 1, bad, opt, sched, {})
    assert "previous checkpoint" not in str(e.value) and "lower train.learning_rate" in str(e.value)
    ckpt.save_checkpoint(root, 1, {"w": torch.ones(2)}, opt, sched, {})
    with pytest.raises(ckpt.CheckpointError, match="the previous checkpoint step-00000001 is kept"):
        ckpt.save_checkpoint(root, 2, bad, opt, sched, {})


def test_metrics_jsonl_is_strict_json(tmp_path):
    """Item 6: a skipped step's NaN loss is written as null (bare NaN is not JSON)."""
    from directalign.logging_utils import MetricsLogger

    logger = MetricsLogger(tmp_path)
    logger.write({"step": 1, "loss": float("nan"), "reward": float("inf"), "grad_norm": 0.5, "skipped": True})
    logger.close()

    def refuse(name):
        raise ValueError(f"bare {name} in metrics.jsonl")

    line = (tmp_path / "metrics.jsonl").read_text().strip()
    record = json.loads(line, parse_constant=refuse)
    assert record == {"step": 1, "loss": None, "reward": None, "grad_norm": 0.5, "skipped": True}
