"""HPSv2 / HPSv2.1 (Wu et al. 2023): an open_clip ViT-H-14 fine-tuned on HPD, run as a transformers ``CLIPModel``.

The published checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt`` from the ``xswu/HPSv2`` hub repo)
are open_clip state dicts. :func:`convert_openclip_state_dict` maps them key by key onto transformers' CLIP, so
neither open_clip nor torchvision is needed; the checkpoint is read with ``torch.load(weights_only=True)`` (or
safetensors), never unpickled as code.

Score, as HPSv2's ``img_score.py`` and the official SRPO code compute it: the plain cosine of the L2-normalised
image and text embeddings (no logit scale), ``cos(f_img, f_txt) / divisor``.

Preprocessing: HPSv2's published ``preprocess_val`` resizes the longest side to 224 (bicubic, on the float tensor)
and pads to a square with black (open_clip ``ResizeMaxSize``), then normalises with OpenAI CLIP's mean / std;
``crop="pad"`` here. The official SRPO training code resizes the shortest side and centre crops instead
(``crop="round"``); for square images, which SRPO trains on, the two are the same resize. ``crop="pad"`` never
clamps the resized image; ``clamp_resized`` (default True: clip to [0, 1] as PIL does) only matters for
``crop="floor"`` / ``"round"``.

The conversion (open_clip key -> transformers key):

====================================================== =====================================================
open_clip                                              transformers ``CLIPModel``
====================================================== =====================================================
``visual.conv1.weight``                                ``vision_model.embeddings.patch_embedding.weight``
``visual.class_embedding``                             ``vision_model.embeddings.class_embedding``
``visual.positional_embedding``                        ``vision_model.embeddings.position_embedding.weight``
``visual.ln_pre.*``                                    ``vision_model.pre_layrnorm.*``
``visual.transformer.resblocks.N.ln_1.*``              ``vision_model.encoder.layers.N.layer_norm1.*``
``visual.transformer.resblocks.N.attn.in_proj_weight`` ``...layers.N.self_attn.{q,k,v}_proj.weight`` (split in 3)
``visual.transformer.resblocks.N.attn.in_proj_bias``   ``...layers.N.self_attn.{q,k,v}_proj.bias`` (split in 3)
``visual.transformer.resblocks.N.attn.out_proj.*``     ``...layers.N.self_attn.out_proj.*``
``visual.transformer.resblocks.N.ln_2.*``              ``...layers.N.layer_norm2.*``
``visual.transformer.resblocks.N.mlp.c_fc.*``          ``...layers.N.mlp.fc1.*``
``visual.transformer.resblocks.N.mlp.c_proj.*``        ``...layers.N.mlp.fc2.*``
``visual.ln_post.*``                                   ``vision_model.post_layernorm.*``
``visual.proj`` (width, dim)                           ``visual_projection.weight`` (transposed)
``token_embedding.weight``                             ``text_model.embeddings.token_embedding.weight``
``positional_embedding``                               ``text_model.embeddings.position_embedding.weight``
``transformer.resblocks.N.*``                          ``text_model.encoder.layers.N.*`` (as the vision blocks)
``ln_final.*``                                         ``text_model.final_layer_norm.*``
``text_projection`` (width, dim)                       ``text_projection.weight`` (transposed)
``logit_scale``                                        ``logit_scale``
====================================================== =====================================================

Architecture facts the state dict cannot tell: attention heads (open_clip ViT-H-14: vision head width 80, so 16
heads; text 16 heads of 64) and the activation (GELU for the LAION-trained ViT-H-14; QuickGELU only for OpenAI's
weights). Text pooling: open_clip takes the token at ``argmax(input_ids)`` (the end-of-text token, the largest id of
the CLIP BPE vocabulary); transformers takes the first end-of-text token, the same position.

Proof of the conversion, against open_clip itself: ``tests/test_hps_openclip_reference.py`` loads a tiny seeded
random ``open_clip.model.CLIP`` of ViT-H-14's family (every parameter away from its default) with
:meth:`HPSv2Reward.from_pretrained` and checks that the raw and normalised image / text features and the HPS scores
equal open_clip's to 1e-5 (measured <= 5e-7), that a broken mapping (swapped q / k / v, untransposed projection,
QuickGELU, wrong heads, misplaced LayerNorm) misses by 0.02 or more, and that ``crop="pad"`` equals HPSv2's
``preprocess_val`` bit for bit (it resizes the float tensor after ``ToTensor``: no 8-bit rounding, no clamping).
open_clip needs torchvision, which cannot be installed beside this project's torch, so the golden data in
``tests/data/hps_openclip_reference/`` is written in a separate environment (open_clip_torch 3.3.0)::

    python3 -m venv /tmp/venv-openclip
    /tmp/venv-openclip/bin/pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch==3.3.0 numpy safetensors
    /tmp/venv-openclip/bin/python tools/hps_openclip_reference.py

``tests/test_reward_zoo.py`` also checks the conversion against a re-implementation of open_clip's forward.

Offline conversion to a plain transformers directory (loads with ``CLIPModel.from_pretrained``)::

    python -m directalign.rewards.hps HPS_v2.1_compressed.pt ./data/hps_ckpt/hpsv2.1-clip \
        --tokenizer laion/CLIP-ViT-H-14-laion2B-s32B-b79K
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .clip_score import LAION_H14, ClipScoreReward, load_clip_tokenizer

HPS_HUB_REPO = "xswu/HPSv2"
HPS_FILES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
# open_clip model configs: vision head width by vision width (ViT-B/L: 64, ViT-H: 80, ViT-g: 88, ViT-bigG: 104).
VISION_HEAD_WIDTH = {768: 64, 1024: 64, 1280: 80, 1408: 88, 1664: 104}
TEXT_HEAD_WIDTH = 64
_IGNORED = ("attn_mask", "logit_bias")

_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}
_TOP = {
    "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "visual.class_embedding": "vision_model.embeddings.class_embedding",
    "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "visual.ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "visual.ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "visual.ln_post.weight": "vision_model.post_layernorm.weight",
    "visual.ln_post.bias": "vision_model.post_layernorm.bias",
    "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
    "positional_embedding": "text_model.embeddings.position_embedding.weight",
    "ln_final.weight": "text_model.final_layer_norm.weight",
    "ln_final.bias": "text_model.final_layer_norm.bias",
    "logit_scale": "logit_scale",
}
_TRANSPOSED = {"visual.proj": "visual_projection.weight", "text_projection": "text_projection.weight"}
_RESBLOCK = re.compile(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.+)$")


class ConversionError(ValueError):
    """The state dict is not an open_clip CLIP with a ViT image tower and a transformer text tower."""


def load_openclip_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of an open_clip checkpoint (``.pt`` / ``.pth`` read with ``weights_only=True``, or ``.safetensors``);
    unwraps ``{"state_dict": ...}`` and strips DistributedDataParallel's ``module.`` prefix."""
    from .loading import load_weights_file  # the one guarded reader: one-line errors, pickled code refused

    obj = load_weights_file(path)
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in obj.items() if torch.is_tensor(v)}


def _count_blocks(sd: dict, prefix: str) -> int:
    n = 0
    while f"{prefix}transformer.resblocks.{n}.ln_1.weight" in sd:
        n += 1
    return n


def openclip_config(sd: dict[str, torch.Tensor], vision_heads: int | None = None, text_heads: int | None = None,
                    hidden_act: str = "gelu"):
    """A transformers ``CLIPConfig`` for an open_clip state dict (shapes from the tensors; heads from open_clip's
    model configs unless given)."""
    from transformers import CLIPConfig

    for key in ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection"):
        if key not in sd:
            raise ConversionError(f"not an open_clip ViT CLIP state dict: no {key!r}")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    t_vocab, t_width = sd["token_embedding.weight"].shape
    if vision_heads is None:
        vision_heads = width // VISION_HEAD_WIDTH.get(width, 64)
    if text_heads is None:
        text_heads = t_width // TEXT_HEAD_WIDTH
    for tower, w, heads in (("vision", width, vision_heads), ("text", t_width, text_heads)):
        if heads < 1 or w % heads:
            raise ConversionError(f"cannot infer the {tower} attention heads of width {w}; pass {tower}_heads")
    text_cfg = dict(
        vocab_size=t_vocab, hidden_size=t_width,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, ""), num_attention_heads=text_heads,
        max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act=hidden_act, layer_norm_eps=1e-5,
        # open_clip pools at argmax(ids): the end-of-text token is the largest id of the CLIP BPE vocabulary
        bos_token_id=t_vocab - 2, eos_token_id=t_vocab - 1, pad_token_id=t_vocab - 1,
        projection_dim=sd["text_projection"].shape[1])
    vision_cfg = dict(
        hidden_size=width, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "visual."), num_attention_heads=vision_heads, image_size=grid * patch,
        patch_size=patch, hidden_act=hidden_act, layer_norm_eps=1e-5, projection_dim=sd["visual.proj"].shape[1])
    return CLIPConfig(text_config=text_cfg, vision_config=vision_cfg, projection_dim=sd["visual.proj"].shape[1])


def convert_openclip_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip CLIP keys -> transformers CLIPModel keys (see the module docstring's table)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key in _IGNORED:
            continue
        if key in _TOP:
            out[_TOP[key]] = value
            continue
        if key in _TRANSPOSED:
            out[_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = _RESBLOCK.match(key)
        if not m:
            raise ConversionError(f"open_clip key {key!r} has no transformers CLIP counterpart (only ViT image "
                                  "towers with a transformer text tower convert)")
        tower = "vision_model" if m.group(1) else "text_model"
        i, rest = m.group(2), m.group(3)
        base = f"{tower}.encoder.layers.{i}"
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind = rest.rsplit("_", 1)[1]  # weight | bias
            q, k, v = value.chunk(3, dim=0)
            for name, part in (("q", q), ("k", k), ("v", v)):
                out[f"{base}.self_attn.{name}_proj.{kind}"] = part.contiguous()
            continue
        module, _, param = rest.rpartition(".")
        if module not in _BLOCK:
            raise ConversionError(f"open_clip key {key!r} has no transformers CLIP counterpart "
                                  "(LayerScale, attention pooling and similar variants are not supported)")
        out[f"{base}.{_BLOCK[module]}.{param}"] = value
    return out


def clip_model_from_openclip(sd: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32, **config_kwargs):
    """A transformers ``CLIPModel`` holding an open_clip state dict's weights (strict: every weight accounted for)."""
    from transformers import CLIPModel

    config = openclip_config(sd, **config_kwargs)
    converted = convert_openclip_state_dict(sd)
    model = CLIPModel(config)
    missing, unexpected = model.load_state_dict({k: v.to(torch.float32) for k, v in converted.items()},
                                                strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ConversionError(f"converted state dict does not fit CLIPModel: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")
    return model.to(dtype)


class HPSv2Reward(ClipScoreReward):
    """HPSv2 / HPSv2.1: cosine score of a converted open_clip ViT-H-14 (see the module docstring)."""

    crop = "pad"

    def __init__(self, model, tokenizer, *, divisor: float = 1.0, image_size: int | None = None,
                 name: str = "hpsv2", crop: str | None = None, clamp_resized: bool = True):
        super().__init__(model, tokenizer, use_logit_scale=False, divisor=divisor, image_size=image_size, name=name,
                         crop=crop, clamp_resized=clamp_resized)

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer: str | Path | None = None, dtype=torch.float32,
                        divisor: float = 1.0, vision_heads: int | None = None, text_heads: int | None = None,
                        **kwargs) -> "HPSv2Reward":
        """``path``: an open_clip checkpoint file (``HPS_v2.1_compressed.pt``), or a directory converted with this
        module's command line (a transformers CLIPModel). ``vision_heads`` / ``text_heads``: only for open_clip
        models whose head width is not in ``VISION_HEAD_WIDTH`` / 64."""
        from transformers import CLIPModel

        from .loading import hf_dtype, load_checked

        p = Path(path)
        if p.is_file():
            model = clip_model_from_openclip(load_openclip_state_dict(p), dtype=dtype, vision_heads=vision_heads,
                                             text_heads=text_heads)
            tok = load_clip_tokenizer(tokenizer or LAION_H14)
        else:
            model = load_checked(CLIPModel, path, **hf_dtype(dtype))
            tok = load_clip_tokenizer(tokenizer or path, fallback=LAION_H14)
        return cls(model, tok, divisor=divisor, **kwargs)


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Convert an open_clip CLIP checkpoint (e.g. HPS_v2.1_compressed.pt) "
                                             "to a transformers CLIPModel directory.")
    ap.add_argument("checkpoint")
    ap.add_argument("out_dir")
    ap.add_argument("--tokenizer", default=LAION_H14, help="CLIP tokenizer to save alongside (dir or hub id)")
    args = ap.parse_args(argv)
    model = clip_model_from_openclip(load_openclip_state_dict(args.checkpoint))
    model.save_pretrained(args.out_dir)
    if args.tokenizer:
        load_clip_tokenizer(args.tokenizer).save_pretrained(args.out_dir)
    print(f"wrote {args.out_dir}")


if __name__ == "__main__":
    main()
