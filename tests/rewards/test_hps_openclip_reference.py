"""HPSv2's open_clip -> transformers conversion, proven against open_clip itself (not a re-implementation).

``tests/data/hps_openclip_reference/`` is golden data written by ``tools/hps_openclip_reference.py``, run in a
separate virtual environment with torch 2.14.1, torchvision 0.29.1 and open_clip_torch 3.3.0 (neither open_clip nor
torchvision can live in this project's environment, see the README). Regenerate it with::

    python3 -m venv /tmp/venv-openclip
    /tmp/venv-openclip/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 numpy safetensors
    /tmp/venv-openclip/bin/python tools/hps_openclip_reference.py

It holds a tiny ``open_clip.model.CLIP`` with ViT towers as in HPSv2's ViT-H-14 (GELU, patch 14, square text
projection; 3 vision heads of width 12, 2 text heads), every parameter seeded random and away from its default,
saved as HPSv2 ships its checkpoints (``{"state_dict": ...}`` in a ``.pt``); open_clip's token ids, image inputs,
raw and normalised features and HPS scores; and small 8-bit images with their preprocessing by HPSv2's published
``preprocess_val`` (``ResizeMaxSize`` on the float tensor, torchvision) and by open_clip 3.x's
``image_transform(resize_mode="longest")`` (PIL). This test runs in the project's environment with neither.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from directalign.rewards import preprocess as pp
from directalign.rewards.hps import (HPSv2Reward, convert_openclip_state_dict, load_openclip_state_dict,
                                     openclip_config)

DATA = Path(__file__).resolve().parents[1] / "data" / "hps_openclip_reference"
CHECKPOINT = DATA / "HPS_tiny_openclip.pt"
# float32 features of order 1 (up to 3.3 here) through 2 + 2 blocks: measured max |diff| 0 (image), 4.8e-7 (text)
# and 6e-8 (scores) against open_clip; 1e-5 leaves room for other BLAS / SDPA kernels. Every mutation below moves
# them by 0.02 to 4.
ATOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    from safetensors.torch import load_file

    cfg = json.loads((DATA / "config.json").read_text(encoding="utf-8"))
    ref = load_file(str(DATA / "reference.safetensors"))
    names = list(cfg["images"])
    ref["pixels"] = torch.cat([torch.stack([ref[f"hpsv2_pixels_{n}"] for n in names]), ref["random_pixels"]])
    return cfg, ref


def load_image(cfg: dict, name: str) -> torch.Tensor:
    """A committed 8-bit image as the reward receives images: (1, 3, H, W) float in [0, 1]."""
    arr = np.asarray(Image.open(DATA / cfg["images"][name]["file"]).convert("RGB"))
    return torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1)[None]


@pytest.fixture(scope="module")
def tokenizer_dir(golden, tmp_path_factory):
    """A word-level tokenizer over the golden vocabulary, laid out as CLIP's BPE (<bos> words <eos>, pad 0, <eos> the
    largest id): the real CLIP tokenizer is on the model hub, which tests cannot reach."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    cfg, _ = golden
    ids = {w: i for i, w in enumerate(cfg["vocab"])}
    tok = Tokenizer(models.WordLevel(ids, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", ids["<bos>"]), ("<eos>", ids["<eos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   unk_token="<unk>",
                                   model_max_length=cfg["model_cfg"]["text_cfg"]["context_length"])
    path = tmp_path_factory.mktemp("hps-golden-tokenizer")
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reward(golden, tokenizer_dir):
    """The path users take: HPSv2Reward.from_pretrained on the open_clip checkpoint file. The tiny model's head
    widths (12, 16) are not ViT-H-14's, so the head counts are passed as documented."""
    cfg, _ = golden
    return HPSv2Reward.from_pretrained(CHECKPOINT, tokenizer=tokenizer_dir, vision_heads=cfg["vision_heads"],
                                       text_heads=cfg["text_heads"])


def features(model, ref) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw projected image and text features of the golden inputs."""
    ids = ref["text_ids"]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=ref["pixels"])
        txt = model.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())
    return getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return float((a - b).abs().max())


# ============================================================================================ conversion
def test_golden_data_is_small_and_from_open_clip(golden):
    cfg, ref = golden
    assert cfg["versions"]["open_clip_torch"] and cfg["versions"]["torchvision"]
    assert sum(f.stat().st_size for f in DATA.rglob("*") if f.is_file()) < 1_000_000
    sd = load_openclip_state_dict(CHECKPOINT)
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in sd and "text_projection" in sd
    # nothing left at open_clip's initial values, so no wrong mapping can pass by accident
    assert float(sd["logit_scale"]) != pytest.approx(np.log(1 / 0.07), abs=1e-3)
    for key in ("visual.ln_pre.weight", "visual.ln_post.bias", "ln_final.weight",
                "transformer.resblocks.1.attn.in_proj_bias", "visual.transformer.resblocks.0.attn.out_proj.bias"):
        base = 1.0 if key.endswith("weight") else 0.0
        assert float((sd[key] - base).abs().min()) > 0 and float((sd[key] - base).abs().mean()) > 0.05, key


def test_config_from_the_state_dict_is_open_clips(reward, golden):
    cfg, _ = golden
    v, t = reward.model.config.vision_config, reward.model.config.text_config
    mc = cfg["model_cfg"]
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.image_size, v.patch_size) == (
        mc["vision_cfg"]["width"], mc["vision_cfg"]["layers"], cfg["vision_heads"], mc["vision_cfg"]["image_size"],
        mc["vision_cfg"]["patch_size"])
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.max_position_embeddings, t.vocab_size) == (
        mc["text_cfg"]["width"], mc["text_cfg"]["layers"], cfg["text_heads"], mc["text_cfg"]["context_length"],
        mc["text_cfg"]["vocab_size"])
    assert v.hidden_act == t.hidden_act == "gelu" and not mc["quick_gelu"]  # nn.GELU, exact erf form
    assert v.layer_norm_eps == t.layer_norm_eps == 1e-5  # nn.LayerNorm's default, as open_clip's
    assert reward.model.config.projection_dim == mc["embed_dim"] and reward.crop == "pad"


def test_tokenizer_gives_open_clips_token_ids(reward, golden):
    cfg, ref = golden
    tok = reward.tokenizer(cfg["prompts"], padding="max_length", truncation=True,
                           max_length=reward.tokenizer.model_max_length, return_tensors="pt")
    assert torch.equal(tok.input_ids, ref["text_ids"])


def test_converted_features_are_open_clips(reward, golden):
    _, ref = golden
    img, txt = features(reward.model, ref)
    assert max_err(img, ref["image_features"]) < ATOL
    assert max_err(txt, ref["text_features"]) < ATOL
    assert max_err(F.normalize(img, dim=-1), ref["image_features_normalized"]) < ATOL
    # the reward's own text path: tokenise, encode, normalise (cached per prompt)
    assert max_err(reward.text_features(golden[0]["prompts"]), ref["text_features_normalized"]) < ATOL
    torch.testing.assert_close(reward.model.logit_scale.detach(), ref["logit_scale"], rtol=0, atol=0)


def test_hps_scores_are_open_clips(reward, golden):
    """HPSv2's img_score.py: image_features @ text_features.T of normalised features (the cosine, no logit scale)."""
    cfg, ref = golden
    with torch.no_grad():
        img = F.normalize(features(reward.model, ref)[0], dim=-1)
        scores = torch.stack([reward.score_texts(img, [p] * len(img)) for p in cfg["prompts"]], dim=1)
    assert max_err(scores, ref["scores"]) < ATOL
    assert float(ref["scores"].std()) > 0.05  # the scores differ between images and prompts: a real check


# A conversion with any of these mistakes must fail the comparison above by far (>= 100x its tolerance), or the
# golden test would prove nothing. Each builds a CLIPModel from a mutated conversion of the same checkpoint.
def _swap(sd: dict, tower: str, a: str, b: str) -> None:
    for layer in range(2):
        for kind in ("weight", "bias"):
            ka, kb = (f"{tower}.encoder.layers.{layer}.self_attn.{x}_proj.{kind}" for x in (a, b))
            sd[ka], sd[kb] = sd[kb], sd[ka]


def _untransposed_text_projection(sd: dict, kwargs: dict) -> None:
    sd["text_projection.weight"] = sd["text_projection.weight"].t().contiguous()  # square: no shape error


def _ln_1_for_ln_2(sd: dict, kwargs: dict) -> None:
    for p in ("weight", "bias"):
        sd[f"text_model.encoder.layers.0.layer_norm2.{p}"] = sd[f"text_model.encoder.layers.0.layer_norm1.{p}"]


def _no_ln_pre(sd: dict, kwargs: dict) -> None:
    for p in ("weight", "bias"):
        del sd[f"vision_model.pre_layrnorm.{p}"]  # left at transformers' initial 1 / 0


MUTATIONS = {
    "vision q/k swapped": lambda sd, kw: _swap(sd, "vision_model", "q", "k"),
    "text q/k swapped": lambda sd, kw: _swap(sd, "text_model", "q", "k"),
    "vision k/v swapped": lambda sd, kw: _swap(sd, "vision_model", "k", "v"),
    "text projection not transposed": _untransposed_text_projection,
    "ln_2 mapped from ln_1": _ln_1_for_ln_2,
    "ln_pre dropped": _no_ln_pre,
    "quick_gelu instead of gelu": lambda sd, kw: kw.update(hidden_act="quick_gelu"),
    "wrong vision head count": lambda sd, kw: kw.update(vision_heads=1),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_the_golden_comparison_catches_a_broken_conversion(golden, mutation):
    from transformers import CLIPModel

    cfg, ref = golden
    sd = load_openclip_state_dict(CHECKPOINT)

    def build(mutate=None):
        converted = convert_openclip_state_dict(sd)
        kwargs = {"vision_heads": cfg["vision_heads"], "text_heads": cfg["text_heads"]}
        if mutate:
            mutate(converted, kwargs)
        model = CLIPModel(openclip_config(sd, **kwargs)).eval()
        _, unexpected = model.load_state_dict(converted, strict=False)
        assert not unexpected
        img, txt = features(model, ref)
        return max(max_err(img, ref["image_features"]), max_err(txt, ref["text_features"]))

    torch.manual_seed(0)
    assert build() < ATOL  # the same construction, unmutated, passes
    assert build(MUTATIONS[mutation]) > 100 * ATOL, mutation


# ============================================================================================ preprocessing
# HPSv2's published preprocess_val resizes the float tensor (torchvision's antialiased bicubic = torch's kernel, no
# 8-bit rounding, no clipping), so the differentiable path must equal it to float precision: measured bit-identical
# (max |diff| 0) on these images. 1e-5 allows float32 round-off only; a kernel, size, rounding, padding or clipping
# difference is >= 1/255 / std ~ 0.015 somewhere (clamping the overshoot, as PIL does, is off by up to 70/255).
PREPROCESS_ATOL = 1e-5


@pytest.mark.parametrize("name", ["landscape", "portrait", "small", "square"])
def test_preprocessing_is_hpsv2s_preprocess_val(reward, golden, name):
    cfg, ref = golden
    image = load_image(cfg, name)
    ours = reward.pixel_values(image)[0]
    assert ours.shape == ref[f"hpsv2_pixels_{name}"].shape == (3, 56, 56)
    assert max_err(ours, ref[f"hpsv2_pixels_{name}"]) < PREPROCESS_ATOL


def test_scores_of_raw_images_are_hpsv2s(reward, golden):
    """End to end, as training calls it: 8-bit images in [0, 1] -> reward(images, prompts) == HPSv2's score of the
    same image file and prompt (HPSv2 preprocess_val, then open_clip's model)."""
    cfg, ref = golden
    prompts = cfg["prompts"]
    for row, name in enumerate(cfg["images"]):
        image = load_image(cfg, name).expand(len(prompts), -1, -1, -1)
        with torch.no_grad():
            got = reward(image, prompts)
        assert max_err(got, ref["scores"][row]) < ATOL, name


# open_clip 3.x's image_transform(resize_mode="longest") resamples the 8-bit PIL image instead: same geometry, but
# PIL rounds and clips to 8 bits after each of its two separable bicubic passes. These images have hard 0 / 255
# edges (a black-and-white checker), where the bicubic overshoot is kept by torch and clipped by PIL, so single
# pixels differ by up to 70/255 (24/255 once the final clip is applied to ours as well); on average they agree to
# 0.41/255 after the clip (1.36/255 without). Tolerances: identical padding, mean |diff| < 0.75/255 after the clip
# and < 2/255 without, and 95 % of values within 1.5/255 after the clip (measured >= 97.1 %). PIL's intermediate
# rounding and clipping explain the rest: emulating them in torch reproduces PIL to 1/255.
@pytest.mark.parametrize("name", ["landscape", "portrait", "small", "square"])
def test_preprocessing_against_open_clips_pil_transform(reward, golden, name):
    cfg, ref = golden
    image = load_image(cfg, name)
    ours = reward.pixel_values(image)[0]
    theirs = ref[f"openclip_pixels_{name}"]
    mean, std = (torch.tensor(v)[:, None, None] for v in (pp.CLIP_MEAN, pp.CLIP_STD))
    black = -mean / std
    pad_ours = (ours - black).abs().amax(0) < 1e-6
    pad_theirs = (theirs - black).abs().amax(0) < 1e-6
    rows_ours, rows_theirs = pad_ours.all(1), pad_theirs.all(1)
    cols_ours, cols_theirs = pad_ours.all(0), pad_theirs.all(0)
    assert torch.equal(rows_ours, rows_theirs) and torch.equal(cols_ours, cols_theirs)  # same resize size + padding
    diff = ((ours - theirs) * std).abs()  # in [0, 1] pixel units
    clipped = (((ours * std + mean).clamp(0, 1) - mean) - (theirs * std)).abs()
    assert float(diff.mean()) < 2 / 255, float(diff.mean()) * 255
    assert float(clipped.mean()) < 0.75 / 255, float(clipped.mean()) * 255
    assert float((clipped <= 1.5 / 255).float().mean()) > 0.95


def test_scores_through_open_clips_pil_transform_are_close(reward, golden):
    """The same images scored by open_clip on its PIL-preprocessed inputs: the 8-bit resampling moves the tiny
    model's cosine by at most 0.02 here (measured 0.009)."""
    cfg, ref = golden
    prompts = cfg["prompts"]
    for row, name in enumerate(cfg["images"]):
        with torch.no_grad():
            got = reward(load_image(cfg, name).expand(len(prompts), -1, -1, -1), prompts)
        assert max_err(got, ref["scores_openclip_pixels"][row]) < 0.02, name
