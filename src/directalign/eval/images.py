"""Image folders with a ``manifest.jsonl``: written by ``directalign sample`` (and ``eval``), scored by
``directalign eval --images``. Each manifest line holds one PNG's file name and everything needed to regenerate it
(prompt, seed, steps, guidance, shift, resolution, model)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import EvalError
from .models import ModelRef


def save_images(images: torch.Tensor, prompts: list[str], seeds: list[int], cfg, ref: ModelRef | None,
                out: Path, extra: list[dict] | None = None) -> list[dict]:
    """PNG files and ``manifest.jsonl`` in ``out``: one line per image with everything needed to regenerate it,
    plus ``extra[i]`` (e.g. steering's reward and chosen candidate) when given."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    records = []
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round().astype("uint8")
    for i, (a, p, s) in enumerate(zip(arr, prompts, seeds)):
        name = f"{i:05d}.png"
        Image.fromarray(a).save(out / name)
        rec = {"file": name, "prompt": p, "seed": int(s), "steps": cfg.eval.steps, "guidance": cfg.eval.guidance,
               "shift": cfg.sampling.shift, "height": cfg.model.height, "width": cfg.model.width}
        if ref is not None:
            rec.update({"model": ref.path or ref.base, "model_kind": ref.kind, "base": ref.base})
        if extra is not None:
            rec.update(extra[i])
        records.append(rec)
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
    return records


def load_image_folder(folder: Path) -> tuple[torch.Tensor, list[dict]]:
    """Images (N, 3, H, W) in [0, 1] and manifest records of a folder written by ``directalign sample`` (or any
    folder with a ``manifest.jsonl`` whose lines hold ``file`` and ``prompt``)."""
    import numpy as np
    from PIL import Image

    manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise EvalError(f"--images {str(folder)!r} has no manifest.jsonl; write the folder with `directalign sample` "
                        "or add one line {\"file\": ..., \"prompt\": ..., \"seed\": ...} per image")
    records, tensors = [], []
    for i, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("file"), str) or "prompt" not in rec:
            raise EvalError(f"{manifest}:{i} needs a JSON object with \"file\" and \"prompt\"")
        file = rec["file"]
        path = folder / file
        if not path.is_file():
            raise EvalError(f"{manifest}:{i}: image {file!r} is missing")
        img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
        tensors.append(torch.from_numpy(img).permute(2, 0, 1))
        records.append(rec)
    if not records:
        raise EvalError(f"{manifest} lists no images")
    if len({t.shape for t in tensors}) > 1:
        raise EvalError(f"images in {str(folder)!r} differ in size; score folders of one resolution")
    return torch.stack(tensors), records
