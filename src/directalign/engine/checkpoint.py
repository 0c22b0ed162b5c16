"""Atomic checkpoints: a checkpoint directory either is complete or does not exist under its final name.

Layout of ``<run>/checkpoints/step-00000020/``:

* ``trainable.safetensors``: the trainable weights (LoRA adapter or the full transformer);
* ``ema.safetensors``: EMA weights, when EMA is on;
* ``optimizer.pt``, ``lr_scheduler.pt``, ``rng.pt``: ``torch.save`` of plain tensors / numbers, loaded with
  ``weights_only=True``;
* ``state.json``: step, data position, config fingerprint, model identity; written last, and then the temporary
  directory is renamed into place (``rename`` is atomic on POSIX). Directories still named ``.tmp-*`` are partial and
  are never loaded; they are removed on the next save.

Only finite weights are saved: a non-finite tensor aborts the save with an error and keeps the previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
PREFIX = "step-"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not fit this run; the message says which and what to do."""


def fingerprint(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(f"refusing to save non-finite weights ({name}); the previous checkpoint is kept")


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / STATE_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def save_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    state: dict, ema: dict[str, torch.Tensor] | None = None, keep: int = 2) -> Path:
    """Write a checkpoint atomically and prune old ones (never the newest complete one)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    trainable = {k: v.detach().contiguous().cpu() for k, v in trainable.items()}
    _check_finite(trainable)
    ema_cpu = {k: v.detach().contiguous().cpu() for k, v in ema.items()} if ema is not None else None
    if ema_cpu is not None:
        _check_finite(ema_cpu)  # before the temporary directory exists, so a refusal leaves nothing behind
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        tmp.mkdir()
        save_file(trainable, str(tmp / "trainable.safetensors"))
        if ema_cpu is not None:
            save_file(ema_cpu, str(tmp / "ema.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step), indent=1))
        with open(tmp / STATE_FILE, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it atomically
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"could not write checkpoint {final} ({e.strerror or e}); free disk space or fix "
                              f"permissions and resume with --resume; the previous checkpoint is intact") from None
    complete = checkpoint_dirs(root)
    for old in complete[:-keep] if keep > 0 else []:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path) -> dict:
    """Read a complete checkpoint (tensors only; nothing pickled is executed)."""
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE}); it was never finished")
    try:
        out = {
            "state": json.loads((path / STATE_FILE).read_text()),
            "trainable": load_file(str(path / "trainable.safetensors")),
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
            "lr_scheduler": torch.load(path / "lr_scheduler.pt", weights_only=True),
            "rng": torch.load(path / "rng.pt", weights_only=True),
        }
    except Exception as e:  # corrupt files: say which checkpoint, never a raw traceback
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to resume from the "
                              f"previous one") from None
    ema = path / "ema.safetensors"
    out["ema"] = load_file(str(ema)) if ema.is_file() else None
    return out
