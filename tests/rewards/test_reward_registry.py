"""The reward registry (``directalign.rewards.registry``): one loader per ``reward.kind``, one factory for training
and ``directalign eval``, on the tiny random reward fixtures of test_reward_zoo.py / test_reward_aesthetic_v25.py.

* Every kind is registered once and builds through the factory; ``load_reward`` fails with a one-line
  :class:`RewardError` (a ``UserError``), including the image-only / relative-form check.
* ``reward.clamp_resized``: ``False`` keeps the bicubic overshoot and equals the official SRPO steps (torchvision's
  resize of the float tensor, written with ``F.interpolate``), ``True`` stays in [0, 1]; the factory hands the flag
  to every kind whose preprocessing resizes (the scores differ on an image whose resize overshoots).
* ``Reward.describe`` / ``Reward.step_metrics``: None / {} on the base class, the terms of a weighted sum.
* ``eval --rewards KIND:PATH`` builds every registered kind through the registry.
* rewards/ imports nothing of the world package, and clip.py / clip_score.py no longer import each other.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from directalign.config import build_config
from directalign.errors import UserError
from directalign.rewards import preprocess as pp
from directalign.rewards.registry import (LOADERS, REWARD_KINDS, RewardError, build_reward, load_reward,
                                          make_reward)
from test_reward_aesthetic_v25 import files as v25_files  # noqa: F401  (fixtures)
from test_reward_zoo import (PROMPTS, aesthetic_files, clip_dir, hps_files,  # noqa: F401  (fixtures)
                             imagereward_files)

CPU = torch.device("cpu")
CLIP_MEAN, CLIP_STD = (torch.tensor(v)[None, :, None, None] for v in (pp.CLIP_MEAN, pp.CLIP_STD))


def overshooting_images(h: int, w: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    """Black / white noise: every edge is hard, so a bicubic resize (up or down) overshoots [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, h, w, generator=g) > 0.5).float()


def official_srpo_preprocess(images: torch.Tensor, size: int) -> torch.Tensor:
    """The official SRPO code's differentiable preprocessing, written out: torchvision ``Resize(size, BICUBIC)`` of
    the float tensor (shortest side to ``size``, long side ``int(size * long / short)``, antialiased bicubic, nothing
    clamped), ``CenterCrop(size)`` (offset ``int(round((L - size) / 2))``), ``Normalize`` with OpenAI CLIP's values."""
    h, w = images.shape[-2:]
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    x = x[..., top : top + size, left : left + size]
    return (x - CLIP_MEAN) / CLIP_STD


def pixels(normalised: torch.Tensor) -> torch.Tensor:
    return normalised * CLIP_STD + CLIP_MEAN


# ============================================================================================ preprocessing
@pytest.mark.parametrize("shape", [(48, 48), (40, 60), (300, 300), (333, 250)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_clamp_resized_off_is_the_official_srpo_resize(shape):
    images = overshooting_images(*shape)
    clamped = pp.published_preprocess(images, 224, "round")
    raw = pp.published_preprocess(images, 224, "round", clamp=False)
    assert float(pixels(clamped).min()) >= -1e-5 and float(pixels(clamped).max()) <= 1 + 1e-5
    assert float(pixels(raw).min()) < -0.02 and float(pixels(raw).max()) > 1.02  # the overshoot is kept
    torch.testing.assert_close(raw, official_srpo_preprocess(images, 224), rtol=0, atol=1e-5)
    torch.testing.assert_close(pixels(clamped), pixels(raw).clamp(0, 1), rtol=0, atol=1e-5)


def test_clamp_resized_covers_every_resizing_path_but_hpsv2s_pad():
    images = overshooting_images(48, 64).requires_grad_(True)
    for crop in ("floor", "round", "squash"):
        on, off = (pp.published_preprocess(images, 224, crop, clamp=c) for c in (True, False))
        assert float((on - off).detach().abs().max()) > 0.05, crop
        # the clamp cuts the gradient of the clipped pixels; without it every output pixel passes gradient back
        g_on, = torch.autograd.grad(on.sum(), images)
        g_off, = torch.autograd.grad(off.sum(), images)
        assert not torch.allclose(g_on, g_off), crop
    pad_on, pad_off = (pp.published_preprocess(images, 224, "pad", clamp=c) for c in (True, False))
    torch.testing.assert_close(pad_on, pad_off, rtol=0, atol=0)  # HPSv2's published resize never clamps
    # nothing to resize: nothing to clamp
    same = overshooting_images(224, 224)
    torch.testing.assert_close(pp.published_preprocess(same, 224, "floor"),
                               pp.published_preprocess(same, 224, "floor", clamp=False), rtol=0, atol=0)


# ============================================================================================ the registry
@pytest.fixture(scope="module")
def hpsv3_and_mps_files(tmp_path_factory):
    """Tiny HPSv3 (official key layout) and MPS (converted layout) checkpoints with their tokenizers."""
    from test_hpsv3 import build_tiny_hpsv3, official_layout
    from test_mps import build_tiny_mps, published_layout

    from directalign.world_paths import reward_dir

    tmp = tmp_path_factory.mktemp("hpsv3-mps")
    hpsv3, tok_dir = build_tiny_hpsv3(tmp)
    save_file(official_layout(hpsv3), str(tmp / "HPSv3.safetensors"))
    save_file(published_layout(build_tiny_mps()), str(tmp / "mps.safetensors"))
    return (tmp / "HPSv3.safetensors", tok_dir), (tmp / "mps.safetensors", reward_dir())


@pytest.fixture
def kinds(random_world, clip_dir, hps_files, aesthetic_files, imagereward_files, v25_files,  # noqa: F811
          hpsv3_and_mps_files):
    """``{kind: (path, options)}`` for every registered kind, on the tiny random fixtures."""
    _, ckpt, tok_dir = hps_files
    _, aroot = aesthetic_files
    _, iroot = imagereward_files
    vroot, _ = v25_files
    (h3, h3_tok), (mps, mps_tok) = hpsv3_and_mps_files
    return {
        "tiny-world": ("tiny-world", {}),
        "clip": (clip_dir, {"use_logit_scale": True}),
        "pickscore": (clip_dir, {"divisor": 20.0}),
        "hpsv2": (ckpt, {"tokenizer": str(tok_dir)}),
        "aesthetic": (aroot / "head.safetensors", {"clip_backbone": str(clip_dir)}),
        "aesthetic-v25": (vroot / "head.safetensors", {"siglip_backbone": str(vroot / "siglip-vision")}),
        "imagereward": (iroot / "ImageReward.pt", {"tokenizer": str(iroot / "bert")}),
        "hpsv3": (h3, {"tokenizer": str(h3_tok)}),
        "mps": (mps, {"tokenizer": str(mps_tok)}),
    }


def test_every_kind_is_registered_once(kinds):
    from directalign.rewards import zoo

    assert list(LOADERS) == list(kinds) and REWARD_KINDS == (*kinds, "sum")
    assert zoo.REWARD_KINDS == REWARD_KINDS and zoo.build_reward is build_reward  # the old names still work
    with pytest.raises(RewardError, match="unknown reward kind 'laion'; choose from tiny-world, clip"):
        make_reward("laion", "x")


def test_the_factory_hands_clamp_resized_to_every_kind(kinds):
    images = overshooting_images(48, 48)
    for kind, (path, options) in kinds.items():
        on = build_reward(kind, path, **options)
        off = build_reward(kind, path, clamp_resized=False, **options)
        assert (on.clamp_resized, off.clamp_resized) == (True, False), kind
        with torch.no_grad():
            a, b = on(images, PROMPTS), off(images, PROMPTS)
            if kind == "hpsv2":  # crop="pad": HPSv2's published resize never clamps, so the flag changes nothing
                torch.testing.assert_close(a, b, rtol=0, atol=0)
                on.crop = off.crop = "round"  # the official SRPO code's resize + centre crop: now it does
                a, b = on(images, PROMPTS), off(images, PROMPTS)
            state_on, state_off = on.encode_images(images), off.encode_images(images)
        assert float((state_on - state_off).abs().max()) > 1e-3 * float(state_on.abs().max()), kind
        if kind != "imagereward":  # the tiny random ImageReward's head is all but constant: its score moves ~1e-6
            assert float((a - b).abs().max()) > 1e-5 * (1 + float(a.abs().max())), kind


def test_the_config_flag_reaches_single_rewards_and_sum_terms(kinds):
    path, _ = kinds["clip"]
    cfg = build_config({}, ["reward.kind=clip", f"reward.path={path}", "reward.clamp_resized=false"])
    assert load_reward(cfg.reward, CPU, cfg.reward.form).clamp_resized is False
    ppath, apath = kinds["pickscore"][0], kinds["aesthetic"][0]
    cfg = build_config({}, ["reward.kind=sum", "reward.clamp_resized=false", f"reward.clip_backbone={path}",
                            "reward.terms.kinds=[pickscore, aesthetic, tiny-world]",
                            f"reward.terms.paths=[{ppath}, {apath}, tiny-world]"])
    reward = load_reward(cfg.reward, "cpu", "official")
    assert [r.clamp_resized for r in reward.rewards] == [False, False, False]
    assert build_config({}, []).reward.clamp_resized is True


def test_load_reward_errors_are_one_line_user_errors(kinds, tmp_path):
    apath, aopts = kinds["aesthetic"]
    cfg = build_config({}, ["reward.kind=aesthetic", f"reward.path={apath}",
                            f"reward.clip_backbone={aopts['clip_backbone']}"])
    for form in ("official", "paper", "relative"):
        with pytest.raises(RewardError, match=r"reward.kind=aesthetic is image-only.*set reward.form=absolute") as e:
            load_reward(cfg.reward, CPU, form)
        assert isinstance(e.value, UserError) and isinstance(e.value, ValueError)
        assert len(str(e.value).splitlines()) == 1
    assert not load_reward(cfg.reward, CPU, "absolute").text_conditioned
    cases = [
        (["reward.kind=hpsv2", f"reward.path={tmp_path / 'nothing-here'}", "reward.tokenizer=/nonexistent"],
         r"could not load reward.path '.*nothing-here' as reward.kind=hpsv2: "),
        (["reward.kind=sum"], r"could not load reward.terms.paths as reward.kind=sum: .*reward.terms.kinds"),
        (["reward.kind=clip", f"reward.path={tmp_path}"], r"reward.kind=clip: .*no config.json"),
    ]
    for overrides, match in cases:
        with pytest.raises(RewardError, match=match) as e:
            load_reward(build_config({}, overrides).reward, CPU, "absolute")
        assert len(str(e.value).splitlines()) == 1


# ============================================================================================ logging hooks
def test_describe_and_step_metrics(kinds):
    from directalign.rewards.weighted import Term, WeightedSumReward

    clip_path, clip_opts = kinds["clip"]
    single = build_reward("clip", clip_path, **clip_opts)
    assert single.describe() is None and single.step_metrics() == {}
    pick_path, pick_opts = kinds["pickscore"]
    parts = [build_reward("pickscore", pick_path), build_reward("tiny-world", "tiny-world")]
    total = WeightedSumReward(parts, [Term("pickscore", 1.0, 20.0, 2.0), Term("tiny-world", 0.5)])
    assert total.describe() == "reward = 1 * (pickscore - 20) / 2 + 0.5 * (tiny-world - 0) / 1"
    assert total.step_metrics() == {}
    images = overshooting_images(32, 32)
    with torch.no_grad():
        total(images, PROMPTS)
        raw = [r(images, PROMPTS) for r in parts]
    metrics = total.step_metrics()
    assert set(metrics) == {"reward_term_pickscore", "reward_term_pickscore/normalized", "reward_term_tiny-world",
                            "reward_term_tiny-world/normalized"}
    assert all(isinstance(v, float) for v in metrics.values())
    assert metrics["reward_term_pickscore"] == pytest.approx(float(raw[0].mean()), rel=1e-5)
    assert metrics["reward_term_pickscore/normalized"] == pytest.approx((float(raw[0].mean()) - 20) / 2, rel=1e-5)
    assert metrics["reward_term_tiny-world"] == pytest.approx(float(raw[1].mean()), rel=1e-5, abs=1e-7)


# ============================================================================================ eval --rewards
def _eval_config(kinds) -> object:
    """Settings of an eval: the run's reward is ImageReward (its tokenizer is reward.tokenizer), the backbones of
    the aesthetic predictors are the tiny ones."""
    ipath, iopts = kinds["imagereward"]
    _, aopts = kinds["aesthetic"]
    _, vopts = kinds["aesthetic-v25"]
    return build_config({}, ["reward.kind=imagereward", f"reward.path={ipath}",
                             f"reward.tokenizer={iopts['tokenizer']}", f"reward.clip_backbone={aopts['clip_backbone']}",
                             f"reward.siglip_backbone={vopts['siglip_backbone']}", "reward.clamp_resized=false",
                             "model.device=cpu"])


def test_eval_reward_specs_resolve_through_the_registry(kinds, tmp_path):
    from directalign.eval.scoring import load_rewards
    from directalign.rewards.aesthetic import LaionAestheticReward
    from directalign.rewards.aesthetic_v25 import AestheticV25Reward
    from directalign.rewards.clip import CLIPReward
    from directalign.rewards.clip_score import ClipScoreReward
    from directalign.rewards.hps import HPSv2Reward
    from directalign.rewards.hps import main as convert_hps
    from directalign.rewards.imagereward import ImageRewardReward
    from directalign.rewards.pickscore import PickScoreReward

    cfg = _eval_config(kinds)
    ckpt, hps_options = kinds["hpsv2"]
    tok_dir = hps_options["tokenizer"]
    converted = tmp_path / "hps-converted"  # an open_clip .pt needs its tokenizer; the converted dir holds one
    convert_hps([str(ckpt), str(converted), "--tokenizer", tok_dir])
    specs = {
        "tiny-world": ("tiny-world", CLIPReward),
        f"clip-{kinds['clip'][0].name}": (f"clip:{kinds['clip'][0]}", ClipScoreReward),
        "pickscore": (f"pickscore:{kinds['pickscore'][0]}", PickScoreReward),
        "hpsv2": (f"hpsv2:{converted}", HPSv2Reward),
        "aesthetic": (f"aesthetic:{kinds['aesthetic'][0]}", LaionAestheticReward),
        "aesthetic-v25": (f"aesthetic-v25:{kinds['aesthetic-v25'][0]}", AestheticV25Reward),
        "imagereward": (f"imagereward:{kinds['imagereward'][0]}", ImageRewardReward),
    }
    own_tokenizer = {"hpsv3", "mps"}  # reward.tokenizer reaches only the run's own kind: each is loaded as one below
    assert {k for k in LOADERS} - own_tokenizer == {s.partition(":")[0] for s, _ in specs.values()}
    from directalign.rewards.hpsv3 import HPSv3Reward
    from directalign.rewards.mps import MPSReward

    for kind, cls in (("hpsv3", HPSv3Reward), ("mps", MPSReward)):
        path, opts = kinds[kind]
        own = build_config({}, [f"reward.kind={kind}", f"reward.path={path}", f"reward.tokenizer={opts['tokenizer']}",
                                "reward.form=absolute", "reward.clamp_resized=false", "model.device=cpu"])
        (r,) = load_rewards([f"{kind}:{path}"], own, False, None)
        assert r.name == kind and type(r.model) is cls and r.model.clamp_resized is False, kind
    got = load_rewards([s for s, _ in specs.values()], cfg, False, None)
    assert [r.name for r in got] == list(specs)
    for r, (name, (_, cls)) in zip(got, specs.items()):
        assert type(r.model) is cls, name
        assert r.model.clamp_resized is False, name  # the run's reward settings reach every spec
    by_name = {r.name: r.model for r in got}
    assert by_name["pickscore"].divisor == 20.0 and by_name["aesthetic"].divisor == 1.0
    assert not by_name[f"clip-{kinds['clip'][0].name}"].use_logit_scale  # eval's clip score is the plain cosine
    # reward.tokenizer names the run's kind's tokenizer (BERT for ImageReward): the CLIP kinds keep their own
    assert "[CLS]" in by_name["imagereward"].tokenizer.get_vocab()
    assert "<eos>" in by_name["pickscore"].tokenizer.get_vocab()
    for bad, match in [("aesthetic", "unknown reward 'aesthetic'; use train, tiny-world or KIND:PATH"),
                       ("laion:/x", "unknown reward 'laion:/x'"),
                       (f"aesthetic:{tmp_path / 'missing.pth'}", "does not exist; give the aesthetic weights"),
                       (f"aesthetic-v25:{kinds['aesthetic'][0]}", "could not load .* as reward kind aesthetic-v25")]:
        with pytest.raises(UserError, match=match) as e:
            load_rewards([bad], cfg, False, None)
        assert len(str(e.value).splitlines()) == 1


def test_eval_command_scores_with_image_only_and_other_kinds(kinds, tmp_path, capsys):
    """``directalign eval --images DIR --rewards aesthetic:PATH,...``: the scores are the registry's rewards'."""
    import yaml

    from directalign.cli import main

    images = overshooting_images(48, 48, n=2, seed=3)  # 0 / 1 pixels: exact in 8-bit PNGs
    folder = tmp_path / "images"
    folder.mkdir()
    lines = []
    for i, (img, prompt) in enumerate(zip(images, PROMPTS)):
        Image.fromarray((img.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file": f"{i}.png", "prompt": prompt, "seed": i}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    r = _eval_config(kinds).reward
    config = tmp_path / "eval.yaml"
    keys = ("kind", "path", "tokenizer", "clip_backbone", "siglip_backbone", "clamp_resized")
    config.write_text(yaml.safe_dump({"reward": {k: getattr(r, k) for k in keys}, "model": {"device": "cpu"}}))
    apath, vpath = kinds["aesthetic"][0], kinds["aesthetic-v25"][0]
    code = main(["eval", "--images", str(folder), "--config", str(config), "--rewards",
                 f"aesthetic:{apath},aesthetic-v25:{vpath}", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 0, err
    per = json.loads((tmp_path / "out" / "per_image.json").read_text())
    for kind, path in (("aesthetic", apath), ("aesthetic-v25", vpath)):
        reward = build_reward(kind, path, clamp_resized=False, **kinds[kind][1])
        with torch.no_grad():
            expected = reward(images, PROMPTS)
        np.testing.assert_allclose([r[f"{kind}.score"] for r in per], expected.numpy(), rtol=1e-4, atol=1e-5)
        assert all(r[f"{kind}.relative"] == 0 for r in per)  # image-only: the control words change nothing


# ============================================================================================ import layering
def _imports(path: Path, package: str) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            mod = ".".join(p for p in (base, node.module or "") if p)
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_rewards_import_nothing_of_the_world_package():
    import directalign.rewards as rewards_pkg

    root = Path(rewards_pkg.__file__).parent
    for path in sorted(root.glob("*.py")):
        imported = _imports(path, "directalign.rewards")
        world = sorted(m for m in imported if m == "directalign.world" or m.startswith("directalign.world."))
        assert not world, f"{path.name} imports {world}"
    clip_imports = _imports(root / "clip.py", "directalign.rewards")
    assert not any(m.startswith("directalign.rewards.clip_score") for m in clip_imports)
    paths_imports = _imports(root.parent / "world_paths.py", "directalign")
    assert not any(m.startswith("directalign") for m in paths_imports)


def test_dtype_names_are_one_map():
    """``model.dtype`` and ``reward.dtype`` accept the same names, and every name resolves through the one map of
    ``engine.precision`` (the planner, the trainer and the reward registry all read it)."""
    from directalign.engine import finetune, precision
    from directalign.engine.config import ModelConfig, RewardConfig
    from directalign.engine.config_parse import choices_of
    from directalign.plan import estimate
    from directalign.rewards import registry

    names = choices_of(ModelConfig, "dtype")
    assert names == choices_of(RewardConfig, "dtype") == registry.DTYPE_NAMES == tuple(precision.DTYPES)
    assert finetune.DTYPES is precision.DTYPES and estimate.DTYPES is precision.DTYPES
    assert registry.DTYPES == precision.DTYPES
    assert [registry.torch_dtype(n) for n in names] == [torch.float32, torch.bfloat16, torch.float16]
    assert registry.torch_dtype(torch.float16) is torch.float16
    with pytest.raises(RewardError, match="reward.dtype 'fp16'; choose from float32, bfloat16, float16"):
        registry.torch_dtype("fp16")
