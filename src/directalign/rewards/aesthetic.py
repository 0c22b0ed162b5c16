"""LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor): an MLP on CLIP ViT-L/14 image
embeddings, image-only (``text_conditioned = False``; SRPO's relative forms do not apply, use ``reward.form=absolute``).

    score = MLP(f_img / |f_img|),   f_img = CLIP ViT-L/14 projected image embedding (768-d)

The MLP is the published ``sac+logos+ava1-l14-linearMSE.pth`` head: ``Linear(768, 1024) - Dropout(0.2) -
Linear(1024, 128) - Dropout(0.2) - Linear(128, 64) - Dropout(0.1) - Linear(64, 16) - Linear(16, 1)`` (no
activations), so its state dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``. It is loaded with
``torch.load(weights_only=True)`` or from ``.safetensors``; dropout is inactive (the reward is frozen, eval mode).
Scores are roughly 1-10.

The backbone is OpenAI's CLIP ViT-L/14 (``openai/clip-vit-large-patch14``, transformers format, vision tower only).
Preprocessing is OpenAI CLIP's ``preprocess`` used by the published inference script: shortest side 224 bicubic,
torchvision centre crop (``crop="round"``), OpenAI CLIP mean / std.

Weights it expects: ``reward.path`` = the head (``sac+logos+ava1-l14-linearMSE.pth`` from the improved-aesthetic-
predictor repository, or a ``.safetensors`` with the same keys), ``reward.clip_backbone`` = the CLIP ViT-L/14.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .clip import projected_features
from .preprocess import published_preprocess

CLIP_L14 = "openai/clip-vit-large-patch14"
HEAD_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


class AestheticMLP(nn.Module):
    """The published head, layer for layer (keys ``layers.0/2/4/6/7``)."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.input_size = input_size
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file read with ``weights_only=True`` (no pickled code), through
    the one guarded reader (:func:`directalign.rewards.loading.load_weights_file`: one-line errors)."""
    from .loading import load_weights_file

    obj = load_weights_file(path)
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    return {k: v for k, v in obj.items() if torch.is_tensor(v)}


def load_head(path: str | Path) -> AestheticMLP:
    sd = load_state_dict_file(path)
    missing = [k for k in HEAD_KEYS if k not in sd]
    extra = sorted(set(sd) - set(HEAD_KEYS))
    if missing or extra:
        raise ValueError(f"{path} is not a LAION aesthetic v2 head: missing {missing[:2]}, unexpected {extra[:2]} "
                         "(expected layers.0/2/4/6/7 weights and biases)")
    head = AestheticMLP(sd["layers.0.weight"].shape[1])
    head.load_state_dict({k: v.float() for k, v in sd.items()})
    return head


class LaionAestheticReward(Reward):
    """``vision``: a ``CLIPVisionModelWithProjection`` (or a ``CLIPModel``); ``head``: :class:`AestheticMLP`."""

    text_conditioned = False

    def __init__(self, vision, head: AestheticMLP, *, divisor: float = 1.0, image_size: int | None = None,
                 crop: str = "round", name: str = "aesthetic", clamp_resized: bool = True):
        super().__init__()
        self.vision = vision
        self.head = head
        self.divisor = divisor
        config = vision.config.vision_config if hasattr(vision.config, "vision_config") else vision.config
        self.image_size = image_size or config.image_size
        self.crop = crop
        self.name = name
        self.clamp_resized = clamp_resized  # False: keep the resize's bicubic overshoot
        self.freeze()

    @classmethod
    def from_pretrained(cls, head_path: str | Path, clip_path: str | Path = CLIP_L14, dtype=torch.float32,
                        **kwargs) -> "LaionAestheticReward":
        from transformers import AutoConfig, CLIPVisionModelWithProjection

        from .loading import hf_dtype, load_checked

        head = load_head(head_path).to(dtype)  # first: a bad head file fails before the large backbone loads
        config = AutoConfig.from_pretrained(clip_path)
        if hasattr(config, "vision_config"):  # a full CLIPModel checkpoint: keep its projection width
            projection_dim = config.projection_dim
            config = config.vision_config
            config.projection_dim = projection_dim
        vision = load_checked(CLIPVisionModelWithProjection, clip_path, config=config, **hf_dtype(dtype))
        return cls(vision, head, **kwargs)

    def _image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        if hasattr(self.vision, "get_image_features"):  # a full CLIPModel
            return projected_features(self.vision.get_image_features(pixel_values=pixels))
        return self.vision(pixel_values=pixels).image_embeds

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        dtype = next(self.head.parameters()).dtype
        pixels = published_preprocess(images.to(dtype), self.image_size, self.crop, clamp=self.clamp_resized)
        return F.normalize(self._image_embeds(pixels), dim=-1)

    def score_texts(self, image_state: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """The aesthetic score of each image (B,); the texts are ignored (image-only reward)."""
        return self.head(image_state).squeeze(-1) / self.divisor
