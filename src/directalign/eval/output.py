"""What the evaluation commands write: output directories, strict JSON, CSV tables, and numbers as table cells."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

from . import EvalError


def json_safe(obj):
    """NaN and inf -> None, tensors and arrays -> lists, paths -> str, so the JSON is strict."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # tensors and arrays
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n", encoding="utf-8")


def write_records_csv(path: Path, records: list[dict]) -> None:
    """One row per record, the union of their keys as columns (in first-seen order); None is an empty cell."""
    keys: list[str] = []
    for rec in records:
        keys += [k for k in rec if k not in keys]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for rec in records:
            w.writerow({k: ("" if v is None else v) for k, v in json_safe(rec).items()})


def write_table_csv(path: Path, columns: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if v is None else v for v in json_safe(r)])


OUTPUTS = Path("outputs")  # where sample / eval / compare / world demo / world gates write by default (git-ignored)


def default_out_dir(command: str, name: str = "") -> Path:
    """``outputs/<command>[-<name>]-<YYYYmmdd-HHMMSS>`` (relative to the current directory), numbered ``-2``,
    ``-3``, ... when that exists already: a command's default output never lands in the current directory itself,
    never replaces an earlier one, and stays out of git (``outputs/`` is in .gitignore)."""
    import re
    import time

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") if name else ""
    stem = "-".join(x for x in (command, safe, time.strftime("%Y%m%d-%H%M%S")) if x)
    out, i = OUTPUTS / stem, 2
    while out.exists():
        out, i = OUTPUTS / f"{stem}-{i}", i + 1
    return out


def check_out_dir(out: Path, overwrite: bool, marker: str) -> Path:
    """Refuse ``out`` unless :func:`prepare_out_dir` may use it; touches nothing, so a command checks its output
    directory before its long work and creates it only when it has something to write."""
    if out.exists() and not out.is_dir():
        raise EvalError(f"--out {str(out)!r} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise EvalError(f"--out {str(out)!r} already exists and is not empty; pass --overwrite or another --out")
        if not (out / marker).exists():
            raise EvalError(f"--out {str(out)!r} holds other files (no {marker}); refusing to overwrite it")
    return out


def prepare_out_dir(out: Path, overwrite: bool, marker: str) -> Path:
    """``out`` as an empty directory. An existing non-empty one is replaced only with ``overwrite`` and only when it
    holds ``marker`` (the file this command writes), so --overwrite never deletes an unrelated directory."""
    check_out_dir(out, overwrite, marker)
    if out.is_dir() and any(out.iterdir()):
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def format_value(v, digits: int = 4) -> str:
    """A number as a table cell: ``digits`` decimals for floats, ``-`` for None, NaN and inf."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
