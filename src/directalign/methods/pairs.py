"""Offline preference pairs for Diffusion-DPO: a prompt, a preferred (winner) and a rejected (loser) image.

Two layouts (``dpo.offline_data``):

* a ``.jsonl`` manifest, one ``{"prompt": "...", "winner": "<path>", "loser": "<path>"}`` per line, the paths
  relative to the manifest (Pick-a-Pic style data converts to it line by line);
* a folder holding, per pair ``NAME``, ``NAME.txt`` (the prompt), ``NAME.winner.<ext>`` and ``NAME.loser.<ext>``
  (``.png``, ``.jpg``, ``.jpeg``, ``.webp``).

Every image is read at load time, resized (shortest side) and centre-cropped to the training resolution exactly as
SRPO's offline images are (:mod:`directalign.data`), so a missing or unreadable file stops the run before any step,
with one line naming the file (and the manifest line) and the fix.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import IMAGE_SUFFIXES, DataError
from ..data import _load_image as load_image

ROW = '{"prompt": "...", "winner": "<image path>", "loser": "<image path>"}'


@dataclass
class PairData:
    winners: torch.Tensor  # (N, 3, H, W) in [0, 1]
    losers: torch.Tensor
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def _rows_from_manifest(manifest: Path) -> list[tuple[str, Path, Path, str]]:
    try:
        lines = manifest.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise DataError(f"pair manifest {manifest} is not UTF-8 text; re-save it as UTF-8") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{manifest}:{i}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{where} is not valid JSON; each line needs {ROW}") from None
        if not isinstance(item, dict) or not all(isinstance(item.get(k), str) and item[k].strip()
                                                 for k in ("prompt", "winner", "loser")):
            raise DataError(f"{where} needs non-empty string fields \"prompt\", \"winner\" and \"loser\": {ROW}")
        paths = []
        for key in ("winner", "loser"):
            path = (manifest.parent / item[key]).resolve()
            if not path.is_file():
                raise DataError(f"{where}: {key} image {item[key]} does not exist (paths are relative to the "
                                "manifest); fix the path or remove the line")
            paths.append(path)
        rows.append((item["prompt"].strip(), paths[0], paths[1], where))
    if not rows:
        raise DataError(f"pair manifest {manifest} lists no pairs; add lines {ROW}")
    return rows


def _image_of(folder: Path, stem: str, role: str) -> Path:
    found = [folder / f"{stem}.{role}{ext}" for ext in IMAGE_SUFFIXES if (folder / f"{stem}.{role}{ext}").is_file()]
    if len(found) != 1:
        what = "no" if not found else "more than one"
        raise DataError(f"pair {folder / stem}.txt has {what} {role} image ({stem}.{role}.png, .jpg, ...); give "
                        "exactly one")
    return found[0]


def _rows_from_folder(folder: Path) -> list[tuple[str, Path, Path, str]]:
    rows = []
    for cap in sorted(folder.glob("*.txt")):
        try:
            prompt = cap.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(f"prompt file {cap} is not UTF-8 text; re-save it as UTF-8") from None
        if not prompt:
            raise DataError(f"prompt file {cap} is empty; write the pair's prompt in it")
        rows.append((prompt, _image_of(folder, cap.stem, "winner"), _image_of(folder, cap.stem, "loser"), str(cap)))
    if not rows:
        raise DataError(f"pair folder {folder} holds no pairs (NAME.txt + NAME.winner.png + NAME.loser.png)")
    return rows


def load_pairs(source: str, height: int, width: int) -> PairData:
    """Read every pair of a manifest or folder (module docstring) into memory; :class:`DataError` on any problem."""
    path = Path(source)
    if path.is_dir():
        rows = _rows_from_folder(path)
    elif path.is_file() and path.suffix == ".jsonl":
        rows = _rows_from_manifest(path)
    elif path.exists():
        raise DataError(f"dpo.offline_data {source!r} is neither a folder of pairs nor a .jsonl manifest")
    else:
        raise DataError(f"dpo.offline_data {source!r} does not exist; make tiny-world pairs with `python -m "
                        f"directalign.world.export_pairs --out {path.parent if path.suffix else path}` or give a "
                        "pair manifest (.jsonl) or folder")
    winners, losers = [], []
    for _prompt, w, l, _where in rows:
        winners.append(load_image(w, height, width))
        losers.append(load_image(l, height, width))
    return PairData(torch.stack(winners), torch.stack(losers), [r[0] for r in rows])
