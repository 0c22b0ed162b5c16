"""Offline mode data: real images with captions replace rollouts (SRPO paper section 4.5, maintainer recipe #10).

Two layouts are accepted:

* a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``), each with a caption in a ``.txt`` file of the same
  name (``cat.png`` + ``cat.txt``); a caption without its image, or two images sharing one caption, is an error;
* a ``.jsonl`` manifest with one ``{"image": "<path, relative to the manifest>", "caption": "..."}`` per line.

Images are resized (shortest side) and centre-cropped to the training resolution and held in memory as float tensors
in [0, 1]; every file is checked at load time so that a corrupt image stops the run before the model loads.

Every image mode Pillow opens is either converted to RGB in [0, 1] or refused with one line (see :func:`to_rgb`):
8-bit modes through Pillow's own conversions, transparency composited over white, 16- and 32-bit integer grayscale
scaled by the range of their stored integer type (a 16-bit PNG's 65535 is 1.0, not 255), 32-bit float grayscale
taken as is when it lies in [0, 1]. The EXIF orientation tag is applied, as image viewers do, and an embedded
colour profile is converted to sRGB. Pillow's modes:
https://pillow.readthedocs.io/en/stable/handbook/concepts.html#modes
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

log = logging.getLogger("directalign")

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


# 8-bit modes Pillow converts to RGB itself (CMYK, YCbCr, LAB and HSV by their colour definitions), modes with an
# alpha channel, and 16-bit integer grayscale modes. "I" (32-bit integer) and "F" (32-bit float) are handled below.
_EIGHT_BIT = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_ALPHA = frozenset({"LA", "PA", "RGBA", "RGBa"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_RAWMODE_INT = re.compile(r"^I(?:;(\d+))?[BLN]?(S?)$")  # "I;16B", "I;32S", "I" (native signed 32-bit), ...


def _stored_type(rawmode: str | None) -> tuple[int, bool] | None:
    """(bits, signed) of the integers a mode-"I" image was decoded from, or None when its decoder does not say."""
    m = _RAWMODE_INT.match(rawmode or "")
    if m is None:
        return None
    if m.group(1) is None:
        return 32, True  # Pillow's rawmode "I": native signed 32-bit
    return int(m.group(1)), bool(m.group(2))


def to_srgb(im, path):
    """``im`` converted from its embedded ICC colour profile to sRGB, the space the models and rewards saw in
    training; an image without a profile, or with an sRGB one, comes back as it is (the same pixels).

    A Display P3 or Adobe RGB photo read without its profile looks desaturated to the model, as in a browser that
    ignores profiles. Transparency survives: a transparent colour or palette entry (PNG ``tRNS``) becomes an alpha
    channel first, and only the colour channels go through the profile. A profile LittleCMS (Pillow's ``ImageCms``)
    cannot apply is skipped with a warning: the pixels are then read as sRGB, which is what every reader without
    colour management does."""
    icc = im.info.get("icc_profile")
    if not icc or im.mode not in ("RGB", "RGBA", "L", "LA", "P", "PA", "CMYK"):
        return im
    import io

    from PIL import ImageCms

    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if ImageCms.getProfileDescription(source).strip().lower().startswith("srgb"):
            return im  # "sRGB IEC61966-2.1", "sRGB built-in", ...: the pixels already are sRGB ("Linear sRGB" is not)
        if im.mode in ("P", "PA"):  # a palette's colours are in the profile's space too
            im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
        elif im.mode in ("L", "RGB") and "transparency" in im.info:
            im = im.convert(im.mode + "A")  # LA / RGBA: the transparent colour as alpha, before its colour changes
        alpha = im.getchannel("A") if im.mode in ("LA", "RGBA") else None
        colour = im.convert(im.mode[:-1]) if alpha is not None else im
        out = ImageCms.profileToProfile(colour, source, ImageCms.createProfile("sRGB"), outputMode="RGB")
        if alpha is not None:
            out.putalpha(alpha)
        return out
    except (OSError, ValueError, ImageCms.PyCMSError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        log.warning(f"image {path}: its colour profile cannot be applied ({first}); its pixels are read as sRGB")
        return im


def to_rgb(im, rawmode: str | None, path):
    """``im`` (a loaded PIL image) as an 8-bit ``RGB`` PIL image, or as a float32 (H, W) grayscale array in [0, 1]
    for 16- and 32-bit images (kept in float so their extra precision survives resizing).

    ``rawmode`` is how the file's pixels were stored (the decoder's raw mode, read before loading): it tells a
    16-bit from a 32-bit integer image, both of which Pillow may open as mode ``I``. Raises :class:`DataError`
    for a mode or a range that has no faithful RGB reading. An embedded colour profile is converted to sRGB
    (:func:`to_srgb`)."""
    from PIL import Image

    im = to_srgb(im, path)
    mode = im.mode
    if mode in _SIXTEEN_BIT:
        return np.asarray(im).astype(np.float32) / 65535.0
    if mode == "I":
        stored = _stored_type(rawmode)
        if stored is None:
            raise DataError(f"image {path} is a 32-bit integer image whose bit depth Pillow does not report; save it "
                            "as an 8- or 16-bit PNG")
        bits, signed = stored
        values = np.asarray(im).astype(np.float64)
        if signed and values.size and values.min() < 0:
            raise DataError(f"image {path} is a signed {bits}-bit image with negative pixel values; save it as an 8- "
                            "or 16-bit PNG with values from 0 (black) up")
        top = 2.0 ** (bits - 1) - 1 if signed else 2.0 ** bits - 1
        return np.clip(values / top, 0.0, 1.0).astype(np.float32)
    if mode == "F":
        values = np.asarray(im, dtype=np.float32)
        finite = bool(np.isfinite(values).all())
        if not finite or (values.size and (values.min() < 0 or values.max() > 1)):
            what = "non-finite values" if not finite else f"values in [{values.min():.4g}, {values.max():.4g}]"
            raise DataError(f"image {path} is a 32-bit float image with {what}, outside [0, 1]; save it as an 8- or "
                            "16-bit PNG")
        return values.copy()
    if mode in ("L", "RGB", "P") and "transparency" in im.info:
        im, mode = im.convert("RGBA"), "RGBA"  # a transparent colour or palette entry (PNG tRNS, GIF)
    if mode in _ALPHA:
        rgba = im.convert("RGBA")  # PA: through the palette; RGBa: un-premultiplied
        flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        flat.alpha_composite(rgba)
        return flat.convert("RGB")
    if mode in _EIGHT_BIT:
        return im.convert("RGB")
    raise DataError(f"image {path} has the Pillow mode {mode!r}, which directalign cannot convert to RGB; save it as "
                    "an 8-bit RGB PNG or JPEG")


def _rawmode_of(im) -> str | None:
    if not im.tile:
        return None
    args = im.tile[0][3]
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else None


def _load_image(path: Path, height: int, width: int) -> torch.Tensor:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            rawmode = _rawmode_of(opened)  # before load(), which clears the tiles
            opened.load()
            im = ImageOps.exif_transpose(opened)  # a copy: usable after the file closes
    except Image.DecompressionBombError:
        raise DataError(f"image {path} is too large to decode safely (over {Image.MAX_IMAGE_PIXELS} pixels); "
                        "downscale it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"image {path} is corrupt or truncated ({type(e).__name__}); replace or remove it") from None
    im = to_rgb(im, rawmode, path)
    gray = isinstance(im, np.ndarray)
    if gray:  # 16/32-bit: resample in float ("F"), not through an 8-bit image
        im = Image.fromarray(im)  # float32 (H, W): mode "F"
    scale = max(height / im.height, width / im.width)
    size = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
    im = im.resize(size, Image.BICUBIC)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    im = im.crop((left, top, left + width, top + height))
    if gray:
        return torch.from_numpy(np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)).unsqueeze(0).repeat(3, 1, 1)
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
        raise DataError(f"srpo.offline_data {source!r} is neither a folder of images nor a .jsonl manifest"
                        if path.exists() else f"srpo.offline_data {source!r} does not exist; make example data with "
                        f"`python -m directalign.world.export_images --out {source}` (tiny world) or give a folder "
                        "of images with .txt captions or a .jsonl manifest")
    images = torch.stack([_load_image(p, height, width) for p, _ in pairs])
    return OfflineData(images, [c for _, c in pairs], [str(p) for p, _ in pairs])
