"""The reward zoo on tiny random-weight models, offline.

* Preprocessing: our differentiable path against the published pipelines run with PIL on real images (rendered
  tiny-world scenes upscaled to photo sizes, square and not): transformers' ``CLIPImageProcessor`` (PIL backend) for
  PickScore / CLIP, torchvision's ``Resize + CenterCrop`` semantics for OpenAI CLIP / ImageReward / the aesthetic
  predictor (PIL bicubic resize, ``round`` crop offset), open_clip's ``ResizeMaxSize`` for HPSv2.
* HPSv2: a reference implementation of open_clip's ViT / text transformer forward with open_clip's parameter names
  on random weights; the converted transformers CLIPModel gives the same embeddings and scores.
* ImageReward: a reference implementation of BLIP's ViT and med BERT (cross-attention) with ImageReward's parameter
  names; the converted transformers BLIP gives the same scores.
* PickScore, CLIP score, the LAION aesthetic predictor, the weighted sum; gradients reach the images and never the
  reward weights; ``load_reward`` builds every kind from the config; SRPO's relative forms on text rewards.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from directalign.config import build_config
from directalign.engine.config import ConfigError
from directalign.methods.registry import METHODS
from directalign.rewards.registry import RewardError
from directalign.rewards.registry import load_reward as load_reward_section
from directalign.rewards import preprocess as pp
from directalign.rewards.aesthetic import AestheticMLP, LaionAestheticReward
from directalign.rewards.clip_score import ClipScoreReward
from directalign.rewards.hps import (ConversionError, HPSv2Reward, convert_openclip_state_dict,
                                     load_openclip_state_dict)
from directalign.rewards.loading import WeightsFileError
from directalign.rewards.imagereward import IMAGEREWARD_MEAN, IMAGEREWARD_STD, ImageRewardReward
from directalign.rewards.pickscore import PickScoreReward
from directalign.rewards.relative import semantic_relative_reward
from directalign.rewards.weighted import Term, WeightedSumReward
from image_helpers import real_images, to_pil

PROMPTS = ["a red circle on a blue background", "a green square on a yellow background"]
WORDS = sorted({w for p in PROMPTS for w in p.split()} | {"textured", "flat", "detailed", "painting", "."})
CPU = torch.device("cpu")


def load_reward(cfg, device):
    """The run's reward as training loads it: the registry's loader, checked against the method's held-out form."""
    return load_reward_section(cfg.reward, device, METHODS[cfg.method].held_out_form(cfg)[0])


# ============================================================================================ offline tokenizers
def word_tokenizer(specials: list[str], template: str, pad: str, max_length: int, eos: str | None = None,
                   bos: str | None = None, unk: str = "<unk>", tail: tuple[str, ...] = ()):
    """A word-level PreTrainedTokenizerFast: ``specials`` first, then WORDS, then ``tail`` (last ids)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = [*specials, *[w for w in WORDS if w not in specials], *tail]
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(ids, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    used = [t for t in template.split() if t != "$A"]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, ids[t]) for t in used])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos,
                                   unk_token=unk, model_max_length=max_length)


def clip_tokenizer(max_length=16):
    """CLIP-like: the end-of-text token has the largest id, as in the CLIP BPE vocabulary (open_clip pools there)."""
    return word_tokenizer(["<pad>", "<bos>", "<unk>"], "<bos> $A <eos>", "<pad>", max_length, eos="<eos>",
                          bos="<bos>", tail=("<eos>",))


def bert_tokenizer(max_length=35):
    return word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[DEC]", "[ENC]"], "[CLS] $A [SEP]", "[PAD]",
                          max_length, unk="[UNK]")


# ============================================================================================ real images
def _normalise(arr: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(arr.astype(np.float32) / 255).permute(2, 0, 1)
    return pp.normalize(x[None])[0]


def ref_transformers(img: torch.Tensor, size=224) -> torch.Tensor:
    """transformers' CLIPImageProcessor, PIL backend (PickScore's processor, CLIP): what the model card runs."""
    from transformers import CLIPImageProcessorPil

    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return torch.as_tensor(np.asarray(proc(images=to_pil(img), return_tensors="np").pixel_values[0]))


def ref_torchvision(img: torch.Tensor, size=224) -> torch.Tensor:
    """torchvision ``Resize(size, BICUBIC) + CenterCrop(size)`` on a PIL image (OpenAI CLIP's preprocess,
    ImageReward's _transform), written with PIL: torchvision resizes PIL images with PIL itself."""
    pil = to_pil(img)
    w, h = pil.size
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    pil = pil.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    return _normalise(np.asarray(pil.crop((left, top, left + size, top + size))))


def ref_resize_max(img: torch.Tensor, size=224) -> torch.Tensor:
    """open_clip ``ResizeMaxSize(size, fill=0)`` on a PIL image (open_clip 3.x's ``resize_mode="longest"``) written
    with PIL. HPSv2's own preprocess_val runs it on the float tensor instead: tests/test_hps_openclip_reference.py."""
    pil = to_pil(img)
    w, h = pil.size
    scale = size / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    pil = pil.resize((nw, nh), Image.BICUBIC)
    canvas = Image.new("RGB", (size, size), (0, 0, 0))
    canvas.paste(pil, ((size - nw) // 2, (size - nh) // 2))
    return _normalise(np.asarray(canvas))


REFERENCES = {"floor": ref_transformers, "round": ref_torchvision, "pad": ref_resize_max}
SHAPES = [(256, 256), (240, 320), (336, 200), (32, 32), (720, 720)]


# Tolerance of the differentiable path against PIL, in pixel units of [0, 1] images (the normalised difference times
# CLIP's std): PIL resamples in 8-bit fixed point and rounds its output to 8 bits; the kernels are the same. Measured:
# max 1.1/255, mean 0.1/255 on these images.
MAX_TOL = 1.5 / 255
MEAN_TOL = 0.25 / 255


@pytest.mark.parametrize("crop", ["floor", "round", "pad"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_differentiable_preprocessing_matches_the_published_pipeline(crop, shape):
    images = real_images(*shape)
    ours = pp.published_preprocess(images, 224, crop)
    if crop == "pad":  # HPSv2 keeps the bicubic overshoot (float tensor resize); PIL clips it to [0, 255]
        mean, std = (torch.tensor(v)[None, :, None, None] for v in (pp.CLIP_MEAN, pp.CLIP_STD))
        ours = pp.normalize((ours * std + mean).clamp(0, 1))
    ref = torch.stack([REFERENCES[crop](img) for img in images])
    assert ours.shape == ref.shape == (3, 3, 224, 224)
    diff = ((ours - ref) * torch.tensor(pp.CLIP_STD)[None, :, None, None]).abs()
    assert float(diff.mean()) < MEAN_TOL, float(diff.mean()) * 255
    assert float(diff.max()) < MAX_TOL, float(diff.max()) * 255


def test_crop_offsets_follow_each_library():
    assert pp.crop_offset(299, 224, "floor") == 37 and pp.crop_offset(299, 224, "round") == 38
    assert pp.resized_size(240, 320, 224) == (224, 298)  # truncated like torchvision / transformers, not rounded


def test_preprocessing_is_differentiable():
    images = real_images(240, 320, n=1).requires_grad_(True)
    for crop in ("floor", "round", "pad"):
        pp.published_preprocess(images, 224, crop).sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0
        images.grad = None


# ============================================================================================ tiny CLIPs
def tiny_clip_config(vocab: int, eos: int, bos: int, pad: int, image_size=224, patch=32):
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=bos, eos_token_id=eos,
                         pad_token_id=pad),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=image_size, patch_size=patch),
        projection_dim=16, logit_scale_init_value=2.6592)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny CLIPModel + tokenizer saved with save_pretrained (stands in for PickScore_v1 / any CLIP / ViT-L/14)."""
    from transformers import CLIPModel

    tok = clip_tokenizer()
    v = tok.get_vocab()
    torch.manual_seed(0)
    model = CLIPModel(tiny_clip_config(len(v), v["<eos>"], v["<bos>"], v["<pad>"]))
    path = tmp_path_factory.mktemp("clip")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _reference_clip_score(model, tok, pixels, texts, logit_scale: bool):
    with torch.no_grad():
        img = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        t = tok(texts, padding="max_length", max_length=tok.model_max_length, return_tensors="pt")
        txt = F.normalize(model.get_text_features(input_ids=t.input_ids, attention_mask=t.attention_mask)
                          .pooler_output, dim=-1)
        scale = model.logit_scale.exp() if logit_scale else 1.0
        return scale * (img * txt).sum(-1)


def test_pickscore_is_the_model_card_score(clip_dir):
    reward = PickScoreReward.from_pretrained(clip_dir, divisor=20.0)
    assert reward.text_conditioned and reward.crop == "floor"
    images = real_images(240, 320, n=2)
    ref_pixels = torch.stack([ref_transformers(img) for img in images])
    expected = _reference_clip_score(reward.model, reward.tokenizer, ref_pixels, PROMPTS, True) / 20.0
    with torch.no_grad():
        got = reward(images, PROMPTS)
        exact = reward.score_texts(F.normalize(reward.model.get_image_features(pixel_values=ref_pixels)
                                               .pooler_output, dim=-1), PROMPTS)
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-6)
    assert float((got - expected).abs().max()) < 0.02 * float(expected.abs().max()) + 1e-3


@pytest.mark.parametrize("use_logit_scale", [False, True])
def test_clip_score_with_any_clip(clip_dir, use_logit_scale):
    reward = ClipScoreReward.from_pretrained(clip_dir, use_logit_scale=use_logit_scale)
    images = real_images(256, 256, n=2)
    pixels = torch.stack([ref_transformers(img) for img in images])
    expected = _reference_clip_score(reward.model, reward.tokenizer, pixels, PROMPTS, use_logit_scale)
    with torch.no_grad():
        got = reward(images, PROMPTS)
    torch.testing.assert_close(got, expected, rtol=0, atol=0.02 * float(expected.abs().max()) + 1e-4)


# ============================================================================================ HPSv2 (open_clip)
class RefResidualAttentionBlock(nn.Module):
    """open_clip ``ResidualAttentionBlock``: pre-LN, nn.MultiheadAttention (fused in_proj), c_fc / GELU / c_proj."""

    def __init__(self, width: int, heads: int, mlp: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, mlp)), ("gelu", nn.GELU()),
                                              ("c_proj", nn.Linear(mlp, width))]))

    def forward(self, x, attn_mask=None):  # (L, N, D), open_clip's sequence-first layout
        y = self.ln_1(x)
        x = x + self.attn(y, y, y, need_weights=False, attn_mask=attn_mask)[0]
        return x + self.mlp(self.ln_2(x))


class RefTransformer(nn.Module):
    def __init__(self, width, layers, heads, mlp):
        super().__init__()
        self.resblocks = nn.ModuleList([RefResidualAttentionBlock(width, heads, mlp) for _ in range(layers)])

    def forward(self, x, attn_mask=None):
        for block in self.resblocks:
            x = block(x, attn_mask)
        return x


class RefVisionTransformer(nn.Module):
    """open_clip ``VisionTransformer`` (class token pooling, no attention pooling, no LayerScale)."""

    def __init__(self, image_size, patch, width, layers, heads, mlp, embed_dim):
        super().__init__()
        grid = image_size // patch
        self.conv1 = nn.Conv2d(3, width, patch, patch, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * 0.1)
        self.positional_embedding = nn.Parameter(torch.randn(grid * grid + 1, width) * 0.1)
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = RefTransformer(width, layers, heads, mlp)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)

    def forward(self, x):
        x = self.conv1(x)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = self.class_embedding.to(x.dtype) + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding
        x = self.ln_pre(x).permute(1, 0, 2)
        x = self.transformer(x).permute(1, 0, 2)
        return self.ln_post(x[:, 0]) @ self.proj


class RefOpenCLIP(nn.Module):
    """open_clip ``CLIP`` with open_clip's parameter names: ``visual.*``, ``token_embedding``, ``transformer``..."""

    def __init__(self, vocab, ctx=16, width=128, layers=2, heads=2, embed_dim=16, v_width=128, v_layers=2,
                 v_heads=2, image_size=224, patch=32):
        super().__init__()
        self.visual = RefVisionTransformer(image_size, patch, v_width, v_layers, v_heads, 4 * v_width, embed_dim)
        self.token_embedding = nn.Embedding(vocab, width)
        self.positional_embedding = nn.Parameter(torch.randn(ctx, width) * 0.1)
        self.transformer = RefTransformer(width, layers, heads, 4 * width)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.randn(width, embed_dim) * width**-0.5)
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.register_buffer("attn_mask", torch.empty(ctx, ctx).fill_(float("-inf")).triu_(1), persistent=False)

    def encode_image(self, pixels):
        return self.visual(pixels)

    def encode_text(self, text):
        x = self.token_embedding(text) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2), attn_mask=self.attn_mask).permute(1, 0, 2)
        x = self.ln_final(x)
        return x[torch.arange(x.shape[0]), text.argmax(dim=-1)] @ self.text_projection


def _randomise(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "ln" in name or "norm" in name or "LayerNorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif name != "logit_scale":
                p.copy_(torch.randn(p.shape, generator=g) * 0.3 / math.sqrt(p.shape[-1] if p.ndim > 1 else 4))


@pytest.fixture(scope="module")
def hps_files(tmp_path_factory):
    """A random open_clip model saved as HPSv2 ships it ({"state_dict": ...} with DDP's ``module.`` prefix)."""
    tok = clip_tokenizer()
    ref = RefOpenCLIP(vocab=len(tok.get_vocab()), ctx=tok.model_max_length)
    _randomise(ref, 1)
    ref.eval()
    root = tmp_path_factory.mktemp("hps")
    torch.save({"epoch": 1, "name": "hps-test",
                "state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}},
               root / "HPS_v2.1_compressed.pt")
    tok.save_pretrained(root / "tokenizer")
    return ref, root / "HPS_v2.1_compressed.pt", root / "tokenizer"


def test_openclip_conversion_gives_the_reference_embeddings_and_scores(hps_files):
    ref, ckpt, tok_dir = hps_files
    reward = HPSv2Reward.from_pretrained(ckpt, tokenizer=tok_dir)
    assert reward.crop == "pad" and not reward.use_logit_scale
    cfg = reward.model.config
    assert (cfg.vision_config.num_attention_heads, cfg.text_config.num_attention_heads) == (2, 2)
    images = real_images(240, 320, n=2)
    pixels = reward.pixel_values(images)
    tok = reward.tokenizer(PROMPTS, padding="max_length", max_length=tok_len(reward), return_tensors="pt")
    with torch.no_grad():
        ref_img = ref.encode_image(pixels)
        ref_txt = ref.encode_text(tok.input_ids)
        ours_img = reward.model.get_image_features(pixel_values=pixels).pooler_output
        ours_txt = reward.model.get_text_features(input_ids=tok.input_ids,
                                                  attention_mask=tok.attention_mask).pooler_output
        torch.testing.assert_close(ours_img, ref_img, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours_txt, ref_txt, rtol=1e-4, atol=1e-5)
        # HPSv2's img_score.py: image_features @ text_features.T of normalised features, diagonal
        expected = (F.normalize(ref_img, dim=-1) * F.normalize(ref_txt, dim=-1)).sum(-1)
        torch.testing.assert_close(reward(images, PROMPTS), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(reward.model.logit_scale, ref.logit_scale)


def tok_len(reward) -> int:
    return reward.tokenizer.model_max_length


def test_openclip_config_of_vit_h_14_matches_open_clip():
    """open_clip's ViT-H-14 (HPSv2's architecture), from tensor shapes alone (meta tensors: no memory)."""
    from directalign.rewards.hps import openclip_config

    def t(*shape):
        return torch.empty(*shape, device="meta")

    sd = {"visual.conv1.weight": t(1280, 3, 14, 14), "visual.positional_embedding": t(257, 1280),
          "visual.proj": t(1280, 1024), "token_embedding.weight": t(49408, 1024), "positional_embedding": t(77, 1024),
          "text_projection": t(1024, 1024), "transformer.resblocks.0.mlp.c_fc.weight": t(4096, 1024),
          "visual.transformer.resblocks.0.mlp.c_fc.weight": t(5120, 1280)}
    sd.update({f"visual.transformer.resblocks.{i}.ln_1.weight": t(1280) for i in range(32)})
    sd.update({f"transformer.resblocks.{i}.ln_1.weight": t(1024) for i in range(24)})
    cfg = openclip_config(sd)
    v, x = cfg.vision_config, cfg.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads, v.intermediate_size) == (1280, 32, 16, 5120)
    assert (v.image_size, v.patch_size, v.hidden_act) == (224, 14, "gelu")
    assert (x.hidden_size, x.num_hidden_layers, x.num_attention_heads, x.max_position_embeddings) == (1024, 24, 16, 77)
    assert (x.eos_token_id, cfg.projection_dim) == (49407, 1024)


def test_openclip_conversion_maps_every_key_and_splits_qkv(hps_files):
    ref, ckpt, _ = hps_files
    sd = load_openclip_state_dict(ckpt)
    assert not any(k.startswith("module.") for k in sd)
    converted = convert_openclip_state_dict(sd)
    w = sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    d = w.shape[1]
    for i, name in enumerate("qkv"):
        torch.testing.assert_close(converted[f"vision_model.encoder.layers.1.self_attn.{name}_proj.weight"],
                                   w[i * d : (i + 1) * d])
    torch.testing.assert_close(converted["text_projection.weight"], sd["text_projection"].t())
    with pytest.raises(ConversionError, match="visual.attn_pool"):
        convert_openclip_state_dict({**sd, "visual.attn_pool.query": torch.zeros(1)})


def test_openclip_checkpoints_are_loaded_without_unpickling_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        torch.save({"state_dict": {"logit_scale": torch.ones(())}, "extra": Payload()}, f)
    with pytest.raises(WeightsFileError, match="evil.pt.*pickled Python objects.*refused, nothing in it ran"):
        load_openclip_state_dict(path)


def test_hps_convert_command_writes_a_transformers_directory(hps_files, tmp_path):
    from directalign.rewards.hps import main

    ref, ckpt, tok_dir = hps_files
    main([str(ckpt), str(tmp_path / "hps-clip"), "--tokenizer", str(tok_dir)])
    a = HPSv2Reward.from_pretrained(tmp_path / "hps-clip")
    b = HPSv2Reward.from_pretrained(ckpt, tokenizer=tok_dir)
    images = real_images(64, 64, n=2)
    with torch.no_grad():
        torch.testing.assert_close(a(images, PROMPTS), b(images, PROMPTS))


def test_hps_scores_images_preprocessed_like_hpsv2(hps_files):
    """The whole pipeline against HPSv2's published transform run with PIL on non-square images."""
    ref, ckpt, tok_dir = hps_files
    reward = HPSv2Reward.from_pretrained(ckpt, tokenizer=tok_dir)
    images = real_images(240, 320, n=2)
    pil_pixels = torch.stack([ref_resize_max(img) for img in images])
    tok = reward.tokenizer(PROMPTS, padding="max_length", max_length=tok_len(reward), return_tensors="pt")
    with torch.no_grad():
        expected = (F.normalize(ref.encode_image(pil_pixels), dim=-1)
                    * F.normalize(ref.encode_text(tok.input_ids), dim=-1)).sum(-1)
        got = reward(images, PROMPTS)
    assert float((got - expected).abs().max()) < 0.01


# ============================================================================================ LAION aesthetic
@pytest.fixture(scope="module")
def aesthetic_files(clip_dir, tmp_path_factory):
    torch.manual_seed(3)
    head = AestheticMLP(16)  # the tiny CLIP's projection dim (768 for ViT-L/14)
    root = tmp_path_factory.mktemp("aesthetic")
    torch.save(head.state_dict(), root / "sac+logos+ava1-l14-linearMSE.pth")
    from safetensors.torch import save_file

    save_file(head.state_dict(), str(root / "head.safetensors"))
    return head, root


def test_aesthetic_head_has_the_published_keys(aesthetic_files):
    head, _ = aesthetic_files
    assert sorted(head.state_dict()) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7)
                                               for p in ("weight", "bias"))


@pytest.mark.parametrize("fname", ["sac+logos+ava1-l14-linearMSE.pth", "head.safetensors"])
def test_aesthetic_reward_is_mlp_of_the_normalised_clip_embedding(aesthetic_files, clip_dir, fname):
    from transformers import CLIPModel

    head, root = aesthetic_files
    reward = LaionAestheticReward.from_pretrained(root / fname, clip_dir)
    assert not reward.text_conditioned
    images = real_images(240, 320, n=2)
    clip = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = torch.stack([ref_torchvision(img) for img in images])  # OpenAI CLIP's preprocess
    with torch.no_grad():
        emb = clip.get_image_features(pixel_values=pixels).pooler_output
        expected = head.eval()(emb / emb.norm(dim=-1, keepdim=True)).squeeze(-1)
        got = reward(images, PROMPTS)
        exact = reward.score_texts(F.normalize(reward.vision(pixel_values=pixels).image_embeds, dim=-1), ["x", "y"])
    torch.testing.assert_close(exact, expected, rtol=1e-5, atol=1e-6)
    assert float((got - expected).abs().max()) < 0.02 * float(expected.abs().max()) + 1e-3
    torch.testing.assert_close(reward.score_texts(reward.encode_images(images), ["a", "b"]).detach(), got)


def test_aesthetic_head_with_wrong_keys_is_refused(tmp_path, clip_dir):
    torch.save({"fc.weight": torch.zeros(1, 16)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="layers.0/2/4/6/7"):
        LaionAestheticReward.from_pretrained(tmp_path / "bad.pth", clip_dir)


# ============================================================================================ ImageReward (BLIP)
class RefBlipAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class RefBlipBlock(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = RefBlipAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, mlp), nn.Linear(mlp, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class RefBlipViT(nn.Module):
    """BLIP ``vit.VisionTransformer`` (timm layout): patch_embed.proj, cls_token, pos_embed, blocks, norm."""

    def __init__(self, image_size=224, patch=32, dim=64, depth=2, mlp=128):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (image_size // patch) ** 2 + 1, dim))
        self.blocks = nn.ModuleList([RefBlipBlock(dim, dim // 64, mlp) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


class RefBertAttention(nn.Module):
    """med ``BertAttention``: self.{query,key,value}, output.{dense,LayerNorm} (post-LN residual)."""

    def __init__(self, hidden, heads, kv_width):
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query = nn.Linear(hidden, hidden)
        self.self.key, self.self.value = nn.Linear(kv_width, hidden), nn.Linear(kv_width, hidden)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(hidden, hidden), nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, h, context, mask):
        b, n, c = h.shape

        def split(t):
            return t.reshape(b, t.shape[1], self.heads, c // self.heads).transpose(1, 2)

        q, k, v = split(self.self.query(h)), split(self.self.key(context)), split(self.self.value(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(c // self.heads) + (1.0 - mask[:, None, None, :]) * -10000.0
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.output.LayerNorm(self.output.dense(ctx) + h)


class RefBertLayer(nn.Module):
    def __init__(self, hidden, heads, inter, enc_width):
        super().__init__()
        self.attention = RefBertAttention(hidden, heads, hidden)
        self.crossattention = RefBertAttention(hidden, heads, enc_width)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(hidden, inter)
        self.output = nn.Module()
        self.output.dense, self.output.LayerNorm = nn.Linear(inter, hidden), nn.LayerNorm(hidden, eps=1e-12)

    def forward(self, h, mask, enc, enc_mask):
        h = self.attention(h, h, mask)
        h = self.crossattention(h, enc, enc_mask)
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(h))) + h)


class RefMedBert(nn.Module):
    """BLIP's ``med.BertModel(add_pooling_layer=False)`` in multimodal mode (bidirectional, cross-attention)."""

    def __init__(self, vocab, hidden=64, heads=1, layers=2, inter=128, enc_width=64, max_pos=40):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(vocab, hidden)
        self.embeddings.position_embeddings = nn.Embedding(max_pos, hidden)
        self.embeddings.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList([RefBertLayer(hidden, heads, inter, enc_width) for _ in range(layers)])

    def forward(self, ids, mask, enc):
        pos = torch.arange(ids.shape[1])[None]
        h = self.embeddings.LayerNorm(self.embeddings.word_embeddings(ids) + self.embeddings.position_embeddings(pos))
        enc_mask = torch.ones(enc.shape[:2])
        for layer in self.encoder.layer:
            h = layer(h, mask.float(), enc, enc_mask)
        return h


class RefImageReward(nn.Module):
    """ImageReward's parameter layout: blip.visual_encoder, blip.text_encoder, blip.{vision,text}_proj, mlp."""

    def __init__(self, vocab):
        super().__init__()
        self.blip = nn.Module()
        self.blip.visual_encoder = RefBlipViT()
        self.blip.text_encoder = RefMedBert(vocab)
        self.blip.vision_proj, self.blip.text_proj = nn.Linear(64, 16), nn.Linear(64, 16)
        self.mlp = AestheticMLP(64)

    def score(self, pixels, ids, mask):
        image_embeds = self.blip.visual_encoder(pixels)
        txt = self.blip.text_encoder(ids, mask, image_embeds)[:, 0, :]
        return ((self.mlp(txt) - IMAGEREWARD_MEAN) / IMAGEREWARD_STD).squeeze(-1)


@pytest.fixture(scope="module")
def imagereward_files(tmp_path_factory):
    tok = bert_tokenizer()
    ref = RefImageReward(len(tok.get_vocab()))
    _randomise(ref, 2)
    ref.eval()
    root = tmp_path_factory.mktemp("imagereward")
    torch.save(ref.state_dict(), root / "ImageReward.pt")
    tok.save_pretrained(root / "bert")
    return ref, root


def test_imagereward_conversion_gives_the_reference_scores(imagereward_files):
    ref, root = imagereward_files
    reward = ImageRewardReward.from_pretrained(root / "ImageReward.pt", tokenizer=root / "bert")
    assert reward.text_conditioned and reward.crop == "round"
    images = real_images(240, 320, n=2)
    pixels = pp.published_preprocess(images, 224, "round")
    tok = reward.tokenizer(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    with torch.no_grad():
        expected = ref.score(pixels, tok.input_ids, tok.attention_mask)
        got = reward(images, PROMPTS)
        torch.testing.assert_close(reward.encode_images(images), ref.blip.visual_encoder(pixels),
                                   rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    # the whole pipeline against ImageReward's published transform run with PIL
    pil_pixels = torch.stack([ref_torchvision(img) for img in images])
    with torch.no_grad():
        via_pil = ref.score(pil_pixels, tok.input_ids, tok.attention_mask)
    assert float((got - via_pil).abs().max()) < 0.05 * float(via_pil.abs().max()) + 1e-3


# ============================================================================================ gradients, relative
def _all_rewards(clip_dir, hps_files, aesthetic_files, imagereward_files):
    _, ckpt, tok_dir = hps_files
    _, aroot = aesthetic_files
    _, iroot = imagereward_files
    return {
        "clip": ClipScoreReward.from_pretrained(clip_dir),
        "pickscore": PickScoreReward.from_pretrained(clip_dir, divisor=20.0),
        "hpsv2": HPSv2Reward.from_pretrained(ckpt, tokenizer=tok_dir),
        "aesthetic": LaionAestheticReward.from_pretrained(aroot / "head.safetensors", clip_dir),
        "imagereward": ImageRewardReward.from_pretrained(iroot / "ImageReward.pt", tokenizer=iroot / "bert"),
    }


def test_every_reward_is_differentiable_in_the_images_and_frozen(clip_dir, hps_files, aesthetic_files,
                                                                imagereward_files):
    for name, reward in _all_rewards(clip_dir, hps_files, aesthetic_files, imagereward_files).items():
        images = real_images(64, 64, n=2).requires_grad_(True)
        scores = reward(images, PROMPTS)
        assert scores.shape == (2,) and torch.isfinite(scores).all(), name
        scores.sum().backward()
        assert images.grad is not None and images.grad.abs().sum() > 0, name
        assert all(not p.requires_grad and p.grad is None for p in reward.parameters()), name
        assert not reward.training, name


def test_relative_forms_work_on_every_text_conditioned_reward(clip_dir, hps_files, aesthetic_files,
                                                             imagereward_files):
    images = real_images(64, 64, n=2)
    for name, reward in _all_rewards(clip_dir, hps_files, aesthetic_files, imagereward_files).items():
        if not reward.text_conditioned:
            with pytest.raises(ValueError, match="image-only"):
                semantic_relative_reward(reward, images, PROMPTS, "official", 0.1, "detailed", "painting")
            continue
        with torch.no_grad():
            got = semantic_relative_reward(reward, images, PROMPTS, "official", 0.25, "detailed", "painting")
            state = reward.encode_images(images)
            pos = reward.score_texts(state, [f"detailed. {p}" for p in PROMPTS])
            neg = reward.score_texts(state, [f"painting. {p}" for p in PROMPTS])
        torch.testing.assert_close(got, 1.25 * pos - neg, msg=name)
        assert float((pos - neg).abs().max()) > 0, name


# ============================================================================================ weighted sum
def test_weighted_sum_is_explicit_and_returns_its_components(clip_dir, hps_files, aesthetic_files,
                                                           imagereward_files):
    zoo = _all_rewards(clip_dir, hps_files, aesthetic_files, imagereward_files)
    terms = [Term("pickscore", 1.0, 0.5, 2.0), Term("hpsv2", 2.0), Term("aesthetic", 0.5, 1.0, 4.0)]
    total = WeightedSumReward([zoo["pickscore"], zoo["hpsv2"], zoo["aesthetic"]], terms)
    assert total.text_conditioned
    assert total.describe() == ("reward = 1 * (pickscore - 0.5) / 2 + 2 * (hpsv2 - 0) / 1 + "
                                "0.5 * (aesthetic - 1) / 4")
    images = real_images(64, 64, n=2)
    with torch.no_grad():
        got, comps = total.forward_with_components(images, PROMPTS)
        raw = {n: zoo[n](images, PROMPTS) for n in ("pickscore", "hpsv2", "aesthetic")}
        score = total(images, PROMPTS)
    expected = sum(t.weight * (raw[t.name] - t.mean) / t.std for t in terms)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(score, expected)
    for t in terms:
        torch.testing.assert_close(comps[t.name], raw[t.name])
        torch.testing.assert_close(comps[f"{t.name}/normalized"], (raw[t.name] - t.mean) / t.std)
        assert total.last_components[t.name] == pytest.approx(float(raw[t.name].mean()), rel=1e-5)
    # the SRPO official form on the sum: term by term; the image-only term contributes k * w * s / std
    k = 0.2
    with torch.no_grad():
        rel = semantic_relative_reward(total, images, PROMPTS, "official", k, "detailed", "painting")
        parts = []
        for t in terms:
            r = zoo[t.name]
            state = r.encode_images(images)
            pos = r.score_texts(state, [f"detailed. {p}" for p in PROMPTS])
            neg = r.score_texts(state, [f"painting. {p}" for p in PROMPTS])
            parts.append(t.weight * ((1 + k) * pos - neg) / t.std - k * t.weight * t.mean / t.std)
    torch.testing.assert_close(rel, sum(parts), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="std must be > 0"):
        Term("x", 1.0, 0.0, 0.0)


# ============================================================================================ config wiring
def _cfg(kind, path, extra=()):
    return build_config({}, [f"reward.kind={kind}", f"reward.path={path}", *extra])


def test_load_reward_builds_every_kind(clip_dir, hps_files, aesthetic_files, imagereward_files, random_world):
    _, ckpt, tok_dir = hps_files
    _, aroot = aesthetic_files
    _, iroot = imagereward_files
    cases = [
        (_cfg("clip", clip_dir, ["reward.use_logit_scale=true"]), ClipScoreReward),
        (_cfg("pickscore", clip_dir, ["reward.divisor=20"]), PickScoreReward),
        (_cfg("hpsv2", ckpt, [f"reward.tokenizer={tok_dir}"]), HPSv2Reward),
        (_cfg("aesthetic", aroot / "head.safetensors", [f"reward.clip_backbone={clip_dir}", "reward.form=absolute"]),
         LaionAestheticReward),
        (_cfg("imagereward", iroot / "ImageReward.pt", [f"reward.tokenizer={iroot / 'bert'}"]), ImageRewardReward),
    ]
    for cfg, cls in cases:
        reward = load_reward(cfg, CPU)
        assert type(reward) is cls
    pick = load_reward(cases[1][0], CPU)
    assert pick.scale == pytest.approx(float(pick.model.logit_scale.exp()) / 20)


def test_load_reward_builds_a_weighted_sum(clip_dir, hps_files, aesthetic_files, random_world):
    _, ckpt, tok_dir = hps_files
    _, aroot = aesthetic_files
    cfg = build_config({}, ["reward.kind=sum", f"reward.tokenizer={tok_dir}", f"reward.clip_backbone={clip_dir}",
                            "reward.terms.kinds=[pickscore, hpsv2, aesthetic, tiny-world]",
                            f"reward.terms.paths=[{clip_dir}, {ckpt}, {aroot / 'head.safetensors'}, tiny-world]",
                            "reward.terms.weights=[1.0, 2.0, 0.1, 1.0]", "reward.terms.means=[20, 0.25, 5, 0]",
                            "reward.terms.stds=[1, 0.05, 1, 1]"])
    reward = load_reward(cfg, CPU)
    assert isinstance(reward, WeightedSumReward)
    assert [t.name for t in reward.terms] == ["pickscore", "hpsv2", "aesthetic", "tiny-world"]
    assert reward.describe().startswith("reward = 1 * (pickscore - 20) / 1 + 2 * (hpsv2 - 0.25) / 0.05")
    assert reward.rewards[0].divisor == 1.0  # raw PickScore: normalisation is the explicit mean / std
    images = real_images(32, 32, n=2)
    _, comps = reward.forward_with_components(images, PROMPTS)
    assert set(comps) == {n for t in reward.terms for n in (t.name, f"{t.name}/normalized")}


def test_image_only_reward_with_a_relative_form_is_refused(clip_dir, aesthetic_files):
    _, aroot = aesthetic_files
    cfg = _cfg("aesthetic", aroot / "head.safetensors", [f"reward.clip_backbone={clip_dir}"])
    with pytest.raises(RewardError, match="image-only.*reward.form=absolute"):
        load_reward(cfg, CPU)


def test_missing_reward_weights_are_named(tmp_path):
    with pytest.raises(RewardError, match="reward.kind=hpsv2"):
        load_reward(_cfg("hpsv2", tmp_path / "nothing-here", ["reward.tokenizer=/nonexistent"]), CPU)


@pytest.mark.parametrize("overrides,match", [
    (["reward.kind=sum", "reward.terms.kinds=[pickscore]", "reward.terms.paths=[]"], "one path per kind"),
    (["reward.kind=sum", "reward.terms.kinds=[pickscore]", "reward.terms.paths=[a]", "reward.terms.stds=[0]"],
     "std must be > 0|every std"),
    (["reward.kind=sum", "reward.terms.kinds=[dalle]", "reward.terms.paths=[a]"], "reward.terms.kinds"),
    (["reward.kind=sum", "reward.terms.kinds=[clip, clip]", "reward.terms.paths=[a, b]",
      "reward.terms.weights=[1]"], "reward.terms.weights"),
    (["reward.kind=laion"], "reward.kind"),
])
def test_reward_config_errors_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build_config({}, overrides)


def test_sum_without_terms_is_refused():
    with pytest.raises(RewardError, match="reward.terms.kinds"):
        load_reward(build_config({}, ["reward.kind=sum"]), CPU)


def test_a_reward_directory_without_its_weights_is_refused(clip_dir, tmp_path):
    """A CLIP directory missing its vision tower would silently start from random weights: an error instead."""
    import shutil

    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(clip_dir, partial)
    weights = partial / "model.safetensors"
    sd = load_file(str(weights))
    save_file({k: v for k, v in sd.items() if not k.startswith("vision_model.")}, str(weights),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not hold the weights a CLIPModel needs"):
        PickScoreReward.from_pretrained(partial)
    torch.save(AestheticMLP(16).state_dict(), tmp_path / "head.pth")  # the head loads first: a valid one
    with pytest.raises(ValueError, match="does not hold the weights"):
        LaionAestheticReward.from_pretrained(tmp_path / "head.pth", partial)
