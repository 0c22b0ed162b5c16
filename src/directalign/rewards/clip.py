"""CLIP-architecture rewards: PickScore, CLIP score, HPSv2-style cosine rewards and the tiny world's reward.

Score of an image and a text: ``scale * cos(f_img, f_txt) / divisor`` with L2-normalised projected embeddings.
HPSv2.1 in the official SRPO code uses the plain cosine (scale 1); PickScore uses ``logit_scale.exp() * cos / 20``.
Preprocessing is differentiable and mirrors CLIP's published pipeline: resize the shortest side to the model's
input size (bicubic, antialiased), centre crop, normalise with CLIP's mean and std.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .base import Reward
from .loading import check_clip_dir, load_checked  # noqa: F401  (check_clip_dir re-exported)
from .preprocess import CLIP_MEAN, CLIP_STD, published_preprocess  # noqa: F401  (re-exported)


def projected_features(output):
    """Projected embedding from ``CLIPModel.get_{image,text}_features`` across transformers versions.

    transformers < 5 returns the tensor itself; transformers >= 5 returns a ``BaseModelOutputWithPooling`` whose
    ``pooler_output`` holds the projected embedding.
    """
    if hasattr(output, "pooler_output"):
        return output.pooler_output
    return output


def clip_preprocess(images: torch.Tensor, size: int, mean=CLIP_MEAN, std=CLIP_STD,
                    clamp: bool = True) -> torch.Tensor:
    """Differentiable CLIP preprocessing of (B, 3, H, W) images in [0, 1] -> normalised (B, 3, size, size):
    shortest side to ``size`` (bicubic; clamped to [0, 1] unless ``clamp=False``), centre crop, normalise, as
    CLIPImageProcessor does."""
    return published_preprocess(images, size, "floor", mean, std, clamp=clamp)


class CLIPReward(Reward):
    """A text-conditioned reward from any ``transformers.CLIPModel`` and its tokenizer.

    Text embeddings are cached per prompt (the reward is frozen), so control phrases cost one text forward each
    for the whole run.
    """

    def __init__(self, model, tokenizer, *, use_logit_scale: bool = False, divisor: float = 1.0,
                 image_size: int | None = None, name: str = "clip", clamp_resized: bool = True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.use_logit_scale = use_logit_scale
        self.divisor = divisor
        self.image_size = image_size or model.config.vision_config.image_size
        self.name = name
        self.clamp_resized = clamp_resized  # False: keep the resize's bicubic overshoot (official SRPO code)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.freeze()

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "CLIPReward":
        """Load a complete ``transformers`` CLIPModel and its tokenizer from a directory or hub id.

        Anything else raises ``ValueError`` (one line, naming the problem) instead of loading silently: a directory
        of another architecture (transformers would fill a CLIPModel with random weights), missing or corrupt
        weights, or a pickle holding code (refused by ``torch.load(weights_only=True)``; nothing in it runs).
        """
        from transformers import AutoTokenizer, CLIPModel

        model = load_checked(CLIPModel, path)  # the one guarded loader every CLIP-family reward uses
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, **kwargs)

    @property
    def scale(self) -> float:
        s = float(self.model.logit_scale.exp()) if self.use_logit_scale else 1.0
        return s / self.divisor

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        dtype = self.model.visual_projection.weight.dtype
        pixels = clip_preprocess(images.to(dtype), self.image_size, clamp=self.clamp_resized)
        return F.normalize(projected_features(self.model.get_image_features(pixel_values=pixels)), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> torch.Tensor:
        missing = sorted({t for t in texts if t not in self._text_cache})
        if missing:
            tok = self.tokenizer(missing, padding="max_length", truncation=True,
                                 max_length=self.tokenizer.model_max_length, return_tensors="pt")
            device = self.model.logit_scale.device
            emb = projected_features(self.model.get_text_features(input_ids=tok.input_ids.to(device),
                                                                  attention_mask=tok.attention_mask.to(device)))
            for t, e in zip(missing, F.normalize(emb, dim=-1)):
                self._text_cache[t] = e
        return torch.stack([self._text_cache[t] for t in texts])

    def score_texts(self, image_state: torch.Tensor, texts: list[str]) -> torch.Tensor:
        txt = self.text_features(texts).to(image_state)
        return self.scale * (image_state * txt).sum(-1)
