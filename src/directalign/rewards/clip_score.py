"""CLIP score with any ``transformers.CLIPModel``: ``scale * cos(f_img, f_txt) / divisor`` (L2-normalised projected
embeddings; ``scale = logit_scale.exp()`` when ``use_logit_scale``, else 1).

This is :class:`directalign.rewards.clip.CLIPReward` with the model's published preprocessing taken literally
(:mod:`directalign.rewards.preprocess`): the resized long side is truncated and the crop offset follows the library
the model was published with (``crop="floor"`` for transformers' ``CLIPImageProcessor``, ``"round"`` for
torchvision's ``CenterCrop``). For square images, the only kind SRPO trains on, both equal ``CLIPReward``'s.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .clip import CLIPReward, projected_features
from .loading import hf_dtype, load_checked  # noqa: F401  (re-exported: the one guarded loader of every reward)
from .preprocess import published_preprocess

# The tokenizer PickScore and HPSv2 were published with (open_clip's ViT-H-14 BPE, 77 tokens).
LAION_H14 = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


def load_clip_tokenizer(path: str | Path, fallback: str | None = None, **kwargs):
    """The tokenizer saved with a CLIP model, or ``fallback`` (a hub id or directory) when the model has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except (OSError, ValueError, TypeError) as first:
        if not fallback or str(fallback) == str(path):
            raise
        try:
            return AutoTokenizer.from_pretrained(fallback, **kwargs)
        except (OSError, ValueError, TypeError):
            raise OSError(f"no tokenizer in {path} ({str(first).splitlines()[0]}) nor in {fallback}; set "
                          "reward.tokenizer to a CLIP tokenizer directory or hub id") from None


class ClipScoreReward(CLIPReward):
    """A frozen CLIPModel scoring images (B, 3, H, W) in [0, 1] against texts; differentiable in the images."""

    crop = "floor"

    def __init__(self, model, tokenizer, *, use_logit_scale: bool = False, divisor: float = 1.0,
                 image_size: int | None = None, name: str = "clip", crop: str | None = None,
                 clamp_resized: bool = True):
        super().__init__(model, tokenizer, use_logit_scale=use_logit_scale, divisor=divisor,
                         image_size=image_size, name=name, clamp_resized=clamp_resized)
        if crop is not None:
            self.crop = crop

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer: str | Path | None = None, dtype=torch.float32,
                        **kwargs) -> "ClipScoreReward":
        from transformers import CLIPModel

        model = load_checked(CLIPModel, path, **hf_dtype(dtype))
        tok = load_clip_tokenizer(tokenizer or path, fallback=kwargs.pop("tokenizer_fallback", None))
        return cls(model, tok, **kwargs)

    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.model.visual_projection.weight.dtype
        return published_preprocess(images.to(dtype), self.image_size, self.crop, clamp=self.clamp_resized)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        feats = projected_features(self.model.get_image_features(pixel_values=self.pixel_values(images)))
        return F.normalize(feats, dim=-1)
