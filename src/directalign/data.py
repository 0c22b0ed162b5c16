"""Offline mode data: real images with captions replace rollouts (SRPO paper section 4.5, maintainer recipe #10).

Two layouts are accepted:

* a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``), each with a caption in a ``.txt`` file of the same
  name (``cat.png`` + ``cat.txt``); a caption without its image, or two images sharing one caption, is an error;
* a ``.jsonl`` manifest with one ``{"image": "<path, relative to the manifest>", "caption": "..."}`` per line.

Images are resized (shortest side) and centre-cropped to the training resolution and held in memory as float tensors
in [0, 1]; every file is checked at load time so that a corrupt image stops the run before the model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from .errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class DataError(UserError, ValueError):
    """Offline data that cannot be used; the message names the file and the fix."""


@dataclass
class OfflineData:
    images: torch.Tensor  # (N, 3, H, W) in [0, 1]
    captions: list[str]
    paths: list[str]

    def __len__(self) -> int:
        return len(self.captions)


def _load_image(path: Path, height: int, width: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            im = im.convert("RGB")
    except Image.DecompressionBombError:
        raise DataError(f"image {path} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels); "
                        "downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {path} is corrupt or truncated ({type(e).__name__}); replace or remove it") from None
    scale = max(height / im.height, width / im.width)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    im = im.resize(size, Image.BICUBIC)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    im = im.crop((left, top, left + width, top + height))
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)


def _pairs_from_folder(folder: Path) -> list[tuple[Path, str]]:
    pairs = []
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DataError(f"offline data folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    stems: dict[str, Path] = {}
    for img in images:
        if img.stem in stems:
            raise DataError(f"images {stems[img.stem].name} and {img.name} in {folder} would share the caption file "
                            f"{img.stem}.txt; rename one of them")
        stems[img.stem] = img
    for cap in sorted(folder.glob("*.txt")):
        if cap.stem not in stems:
            raise DataError(f"caption {cap} has no image of the same name ({cap.stem}.png, .jpg, ...); add the image "
                            "or remove the caption")
    for img in images:
        cap = img.with_suffix(".txt")
        if not cap.is_file():
            raise DataError(f"image {img} has no caption file {cap.name}; add one or remove the image")
        try:
            text = cap.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(f"caption {cap} is not UTF-8 text; re-save it as UTF-8") from None
        if not text:
            raise DataError(f"caption {cap} is empty; write the image's caption in it")
        pairs.append((img, text))
    return pairs


def _pairs_from_manifest(manifest: Path) -> list[tuple[Path, str]]:
    pairs = []
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"manifest {manifest} is not UTF-8 text; re-save it as UTF-8") from None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{manifest}:{i} is not valid JSON; each line needs {{\"image\": ..., \"caption\": ...}}"
                            ) from None
        if not isinstance(item, dict) or not isinstance(item.get("image"), str) \
                or not isinstance(item.get("caption"), str) or not item["caption"].strip():
            raise DataError(f"{manifest}:{i} needs string fields \"image\" and a non-empty \"caption\"")
        path = (manifest.parent / item["image"]).resolve()
        if not path.is_file():
            raise DataError(f"{manifest}:{i}: image {item['image']} does not exist")
        pairs.append((path, item["caption"].strip()))
    if not pairs:
        raise DataError(f"manifest {manifest} lists no images")
    return pairs


def load_offline(source: str, height: int, width: int) -> OfflineData:
    path = Path(source)
    if path.is_dir():
        pairs = _pairs_from_folder(path)
    elif path.is_file() and path.suffix == ".jsonl":
        pairs = _pairs_from_manifest(path)
    else:
        raise DataError(f"srpo.offline_data {source!r} is neither a folder of images nor a .jsonl manifest")
    images = torch.stack([_load_image(p, height, width) for p, _ in pairs])
    return OfflineData(images, [c for _, c in pairs], [str(p) for p, _ in pairs])
