"""PickScore (Kirstain et al. 2023): a CLIP ViT-H/14 fine-tuned on Pick-a-Pic, loaded as a transformers CLIPModel.

Score, as in the PickScore model card and the official SRPO code::

    logit_scale.exp() * cos(f_img, f_txt) / divisor

with ``divisor = 20`` in SRPO ("to make score-scope comparable with hps"); ``divisor = 1`` gives raw PickScore
(about 20-23 for typical images). Preprocessing is PickScore's processor (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``:
shortest side 224 bicubic, centre crop 224 with transformers' floor offset, OpenAI CLIP mean / std).

Weights: ``yuvalkirstain/PickScore_v1`` (hub id or a local copy); the tokenizer is read from the same directory
when present, otherwise from ``reward.tokenizer`` (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .clip_score import LAION_H14, ClipScoreReward

PICKSCORE_HUB_ID = "yuvalkirstain/PickScore_v1"
SRPO_DIVISOR = 20.0


class PickScoreReward(ClipScoreReward):
    crop = "floor"

    def __init__(self, model, tokenizer, *, divisor: float = 1.0, image_size: int | None = None,
                 name: str = "pickscore", clamp_resized: bool = True):
        super().__init__(model, tokenizer, use_logit_scale=True, divisor=divisor, image_size=image_size, name=name,
                         clamp_resized=clamp_resized)

    @classmethod
    def from_pretrained(cls, path: str | Path = PICKSCORE_HUB_ID, tokenizer: str | Path | None = None,
                        dtype=torch.float32, divisor: float = 1.0, **kwargs) -> "PickScoreReward":
        from transformers import CLIPModel

        from .clip_score import load_clip_tokenizer
        from .loading import hf_dtype, load_checked

        model = load_checked(CLIPModel, path, **hf_dtype(dtype))
        tok = load_clip_tokenizer(tokenizer or path, fallback=LAION_H14)
        return cls(model, tok, divisor=divisor, **kwargs)
