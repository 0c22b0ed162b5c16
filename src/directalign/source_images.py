"""Source images of edit prompts: where a family that edits images (``model.family=qwen-image-edit``) gets the
image each prompt edits.

Prompts stay strings everywhere; the image travels in the prompt files themselves:

* ``train.prompts`` / ``eval.prompts``: a ``.jsonl`` manifest (``{"prompt": "...", "image": "src/cat.png"}`` per
  line) or a ``.csv`` file with ``prompt`` and ``image`` columns, image paths relative to the manifest's folder;
* the method's ``offline_data`` (offline SRPO: ``srpo.offline_data``): its ``.jsonl`` manifest's ``image`` is the
  target (the clean image) and a ``source`` field names the image the ``caption`` (or ``prompt``) edits.

:func:`for_config` reads and checks every source image a run needs before any model loads (a missing, unreadable
or ambiguous image is one :class:`SourceImageError` line naming the file and the fix); :func:`attach` hands the map
to the adapter. Families that generate from text alone ignore the column. One prompt string names one source image
(the adapter's map is keyed by prompt): a manifest that gives the same prompt two different images is refused.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from .errors import UserError
from .prompts import load_prompts

PROMPT_IMAGE_KEY = "image"  # the source-image column of a prompt manifest
OFFLINE_SOURCE_KEY = "source"  # the source-image field of an offline-data manifest (its "image" is the target)
OFFLINE_TEXT_KEYS = ("caption", "prompt")  # the edit instruction: SRPO's "caption", a pair manifest's "prompt"


class SourceImageError(UserError, ValueError):
    """An edit prompt without a usable source image; the message names the prompt or file and the fix."""


def _text(item: dict, keys: tuple[str, ...]) -> str:
    return next((str(item[k]).strip() for k in keys if item.get(k)), "")


def _manifest_rows(source: str, text_keys: tuple[str, ...], image_key: str) -> list[tuple[str, str | None, str]]:
    """(prompt, image or None, where) per row of a .jsonl / .csv manifest; [] for other sources."""
    path = Path(source)
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv") or not path.is_file():
        return []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise SourceImageError(f"manifest {source!r} is not UTF-8 text; re-save it as UTF-8") from None
    rows = []
    if suffix == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                raise SourceImageError(f"{source}:{i} is not valid JSON; each line needs one JSON object") from None
            if isinstance(item, dict):
                rows.append((_text(item, text_keys), item.get(image_key), f"{source}:{i}"))
    else:
        for i, row in enumerate(csv.DictReader(io.StringIO(text)), 2):
            rows.append((_text(row, text_keys), row.get(image_key) or None, f"{source}:{i}"))
    return rows


def check_image(path: Path, where: str) -> None:
    """A one-line :class:`SourceImageError` unless ``path`` is an image file Pillow can read."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise SourceImageError(f"{where}: source image {str(path)!r} does not exist (paths are relative to the "
                               "manifest's folder); fix the path or remove the row")
    try:
        with Image.open(path) as im:
            im.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise SourceImageError(f"{where}: source image {str(path)!r} is not a readable image ({type(e).__name__}); "
                               "replace it with a PNG or JPEG") from None


def manifest_images(source: str, text_keys: tuple[str, ...] = ("prompt",),
                    image_key: str = PROMPT_IMAGE_KEY) -> dict[str, Path]:
    """``{prompt: source image path}`` of a manifest, each image checked; rows without an image are left out."""
    out: dict[str, Path] = {}
    for prompt, image, where in _manifest_rows(source, text_keys, image_key):
        if not image or not prompt:
            continue
        if not isinstance(image, str):
            raise SourceImageError(f"{where}: {image_key!r} must be a path string")
        path = (Path(source).parent / image).resolve()
        if prompt in out and out[prompt] != path:
            raise SourceImageError(f"{where}: prompt {prompt!r} already has the source image {str(out[prompt])!r}; "
                                   "one prompt names one image, so make the prompts of different images differ")
        check_image(path, where)
        out[prompt] = path
    return out


def needs_source_images(family: str) -> bool:
    from .adapters.loading import FAMILIES

    return bool(getattr(FAMILIES[family].adapter_class(), "needs_source_images", False))


def for_config(cfg, training: bool, family: str | None = None) -> dict[str, Path]:
    """Every source image the run's prompts need (``{}`` for a text-to-image family). Training reads
    ``train.prompts``, ``eval.prompts`` and the offline data; evaluation ``eval.prompts``. Each prompt of those
    files must have an image."""
    family = family or cfg.model.family
    if not needs_source_images(family):
        return {}
    keys = [("train.prompts", cfg.train.prompts)] if training else []
    keys.append(("eval.prompts" if training else "eval.prompts (--prompts)", cfg.eval.prompts))
    out: dict[str, Path] = {}
    for key, source in keys:
        prompts = load_prompts(source)  # the file's own format errors first
        images = manifest_images(source)
        missing = [p for p in prompts if p not in images]
        if missing:
            raise SourceImageError(f"{key} {source!r} gives no source image for {missing[0]!r} (model.family="
                                   f"{family} edits an image); give a .jsonl or .csv manifest with 'prompt' and "
                                   "'image' columns")
        out.update(images)
    from .methods.registry import METHODS

    name = METHODS[cfg.method].section
    offline = getattr(getattr(cfg, name, None), "offline_data", "") if training else ""
    if offline:
        images = manifest_images(offline, OFFLINE_TEXT_KEYS, OFFLINE_SOURCE_KEY)
        captions = [c for c, _, _ in _manifest_rows(offline, OFFLINE_TEXT_KEYS, OFFLINE_SOURCE_KEY)]
        missing = [c for c in captions if c not in images] if captions else ["(a folder of images)"]
        if missing:
            raise SourceImageError(f"{name}.offline_data {offline!r} gives no source image for {missing[0]!r} "
                                   f"(model.family={family} edits an image); give a .jsonl manifest whose lines "
                                   f"carry \"{OFFLINE_SOURCE_KEY}\" (the edited image) beside \"image\" and "
                                   "\"caption\"")
        out.update(images)
    return out


def load_source_image(path):
    """A source image as an RGB PIL image, EXIF orientation applied and any Pillow mode converted the way offline
    images are (:func:`directalign.data.to_rgb`); a corrupt file is one :class:`SourceImageError` line."""
    import numpy as np
    from PIL import Image, ImageOps

    from .data import DataError, _rawmode_of, to_rgb

    try:
        with Image.open(path) as opened:
            rawmode = _rawmode_of(opened)
            opened.load()
            im = ImageOps.exif_transpose(opened)
        im = to_rgb(im, rawmode, path)
    except DataError as e:
        raise SourceImageError(str(e)) from None
    except OSError as e:
        raise SourceImageError(f"source image {str(path)!r} is corrupt or truncated ({type(e).__name__}); replace "
                               "it") from None
    if isinstance(im, np.ndarray):  # 16/32-bit grayscale as float in [0, 1]
        im = Image.fromarray((im * 255).round().astype(np.uint8)).convert("RGB")
    return im


def attach(adapter, images: dict[str, Path]) -> None:
    """Give an adapter that edits images its prompts' source images (no-op for text-to-image adapters)."""
    if images and hasattr(adapter, "set_source_images"):
        adapter.set_source_images(images, load=load_source_image)
