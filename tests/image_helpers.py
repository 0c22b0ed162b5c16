"""Real image tensors for the reward tests' preprocessing comparisons (shared by several test files)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from directalign.world import dataset as ds


def real_images(h: int, w: int, n: int = 3, seed: int = 0) -> torch.Tensor:
    """Rendered tiny-world scenes (shapes, checker textures) upscaled to (h, w), exactly representable in 8 bits."""
    small = ds.render_batch(ds.sample_examples(n, seed))
    big = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False).clamp(0, 1)
    return torch.round(big * 255) / 255


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
