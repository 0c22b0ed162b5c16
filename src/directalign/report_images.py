"""Image grids as PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_grid(images: torch.Tensor, ncol: int, pad: int = 2, upscale: int = 1) -> Image.Image:
    """(N, 3, H, W) in [0, 1] -> one PIL image, ``ncol`` per row, white padding, optional nearest upscaling.
    Videos (N, F, 3, H, W) are drawn as frame strips (N, 3, H, F * W), frames left to right."""
    images = images.detach().float().cpu().clamp(0, 1)
    if images.ndim == 5:
        images = torch.cat(images.unbind(1), dim=-1)
    n, _, h, w = images.shape
    ncol = max(1, min(ncol, n))
    nrow = (n + ncol - 1) // ncol
    canvas = torch.ones(3, nrow * (h + pad) + pad, ncol * (w + pad) + pad)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    arr = (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    pil = Image.fromarray(arr)
    if upscale > 1:
        pil = pil.resize((pil.width * upscale, pil.height * upscale), Image.NEAREST)
    return pil


def save_grid(images: torch.Tensor, path: Path, ncol: int = 8, upscale: int = 3) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_grid(images, ncol, upscale=upscale).save(path)
    return path
