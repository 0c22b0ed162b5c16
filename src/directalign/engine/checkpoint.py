"""Atomic checkpoints: a checkpoint directory either is complete or does not exist under its final name.

Layout of ``<run>/checkpoints/step-00000020/``:

* ``trainable.safetensors``: the trainable weights (LoRA adapter or the full transformer);
* ``ema.safetensors``: EMA weights, when EMA is on;
* ``method.safetensors``: a method's own tensors that live across steps (its ``state_dict()``: a reference
  refreshed every K steps, an EMA "old" policy), when it has any;
* ``optimizer.pt``, ``lr_scheduler.pt``, ``rng.pt``: ``torch.save`` of plain tensors / numbers, loaded with
  ``weights_only=True`` (a file holding any other pickled object is refused, nothing in it runs);
* ``state.json``: step, data position, config fingerprint, model identity; written last, and then the temporary
  directory is renamed into place (``rename`` is atomic on POSIX).

Crash safety, whatever moment a process dies at:

* a new checkpoint is written under ``.tmp-step-N-<pid>`` and only renamed to ``step-N`` once every file is written
  and synced, so a ``step-*`` directory is always complete. Directories still named ``.tmp-*`` are partial: they are
  never loaded and are removed on the next save;
* re-saving a step that exists moves the old copy aside as ``.tmp-old-step-N-<pid>``, moves the new one in and only
  then deletes the old one. If the process dies between the two renames, the old copy (complete: it was a
  ``step-*`` directory) is still listed as step N, and the next save renames it back;
* old checkpoints are deleted by renaming them to ``.tmp-del-*`` first, so a half-deleted checkpoint never keeps its
  ``step-*`` name; retention (``keep``) never deletes the checkpoint just written, so at least one complete
  checkpoint always exists once one has been written;
* a failed write (disk full, permissions) raises :class:`CheckpointError` and leaves the previous checkpoints as
  they were.

Only finite weights are saved: a non-finite tensor aborts the save with an error that says whether an earlier
checkpoint exists (it is kept).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from ..errors import UserError

STATE_FILE = "state.json"
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".tmp-old-"
FILES = ("trainable.safetensors", "optimizer.pt", "lr_scheduler.pt", "rng.pt", STATE_FILE)
# Test hook: sleep this many seconds after each file of a checkpoint is written (and between the renames of a
# re-save), so that a test can kill the process while a checkpoint is being written. Unset in normal use.
SLOW_ENV = "DIRECTALIGN_TEST_SLOW_CHECKPOINT"
_STEP_RE = re.compile(r"^step-(\d+)$")
_OLD_RE = re.compile(r"^\.tmp-old-(step-\d+)-\d+$")


class CheckpointError(UserError, RuntimeError):
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


def _test_pause() -> None:
    value = os.environ.get(SLOW_ENV)
    if value:
        try:
            time.sleep(float(value))
        except ValueError:
            pass


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


def _check_finite(tensors: dict[str, torch.Tensor], root: Path) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            previous = latest_checkpoint(root)
            kept = (f"the previous checkpoint {previous.name} is kept" if previous is not None else
                    "no checkpoint of this run exists yet, so none is kept")
            raise CheckpointError(f"refusing to save non-finite weights ({name}): training diverged; {kept}; lower "
                                  "train.learning_rate and start the run again")


def _remove(path: Path) -> None:
    """Delete a checkpoint directory so that no half-deleted copy keeps a loadable name: rename, then delete."""
    doomed = path.parent / f"{TMP_PREFIX}del-{path.name}-{os.getpid()}-{time.monotonic_ns()}"
    try:
        path.rename(doomed)
    except OSError:
        doomed = path
    shutil.rmtree(doomed, ignore_errors=True)


def _complete(path: Path) -> bool:
    return path.is_dir() and (path / STATE_FILE).is_file()


def _step_of(path: Path) -> int:
    name = path.name
    m = _OLD_RE.match(name)
    return int((m.group(1) if m else name)[len(PREFIX):])


def checkpoint_dirs(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (one directory per step).

    A step whose ``step-N`` directory is missing while a complete ``.tmp-old-step-N-*`` copy exists (a re-save
    interrupted between its two renames) is listed with that copy; the next save renames it back.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    by_step: dict[int, Path] = {}
    olds = []
    for p in root.iterdir():
        if _STEP_RE.match(p.name) and _complete(p):
            by_step[_step_of(p)] = p
        elif _OLD_RE.match(p.name) and _complete(p):
            olds.append(p)
    for p in sorted(olds, key=lambda q: q.name):
        by_step.setdefault(_step_of(p), p)
    return [by_step[s] for s in sorted(by_step)]


def latest_checkpoint(root: Path) -> Path | None:
    dirs = checkpoint_dirs(root)
    return dirs[-1] if dirs else None


def recover(root: Path) -> None:
    """Finish what a killed save left behind: restore interrupted re-saves and delete partial directories."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.iterdir(), key=lambda q: q.name):
        m = _OLD_RE.match(p.name)
        if m:
            final = root / m.group(1)
            if _complete(p) and not _complete(final):
                if final.exists():
                    _remove(final)
                p.rename(final)
            else:
                _remove(p)
    for stale in root.glob(f"{TMP_PREFIX}*"):
        if not _OLD_RE.match(stale.name):
            shutil.rmtree(stale, ignore_errors=True)
    _fsync_dir(root)


def _write_error(final: Path, root: Path, e: BaseException) -> CheckpointError:
    if isinstance(e, OSError) and e.strerror:
        detail = e.strerror
    else:  # torch.save raises RuntimeError and safetensors SafetensorError on a full disk
        detail = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"
    try:
        free = f"; {shutil.disk_usage(root).free / 2**20:.0f} MB free on that disk"
    except OSError:
        free = ""
    previous = latest_checkpoint(root) if root.is_dir() else None
    kept = (f"the previous checkpoint {previous.name} is intact; continue with --resume after fixing it" if previous
            else "no earlier checkpoint exists")
    return CheckpointError(f"could not write checkpoint {final} ({detail}{free}); free disk space or fix permissions "
                           f"under {root}: {kept}")


def save_checkpoint(root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, lr_scheduler,
                    state: dict, ema: dict[str, torch.Tensor] | None = None, keep: int = 2,
                    method_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint atomically and prune old ones (never the one just written, so never the only one).

    ``optimizer`` is the optimizer or its state dict (FSDP runs pass the unsharded state, numbered like
    ``optimizer.state_dict()``)."""
    root = Path(root)
    trainable = {k: v.detach().contiguous().cpu() for k, v in trainable.items()}
    _check_finite(trainable, root)
    ema_cpu = {k: v.detach().contiguous().cpu() for k, v in ema.items()} if ema is not None else None
    if ema_cpu is not None:
        _check_finite(ema_cpu, root)  # before the temporary directory exists, so a refusal leaves nothing behind
    method_cpu = {k: v.detach().contiguous().cpu() for k, v in (method_state or {}).items()}
    _check_finite(method_cpu, root)
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        recover(root)
        tmp.mkdir()
        save_file(trainable, str(tmp / "trainable.safetensors"))
        _test_pause()
        if ema_cpu is not None:
            save_file(ema_cpu, str(tmp / "ema.safetensors"))
            _test_pause()
        if method_cpu:
            save_file(method_cpu, str(tmp / "method.safetensors"))
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
        _test_pause()
        torch.save(lr_scheduler.state_dict(), tmp / "lr_scheduler.pt")
        _test_pause()
        torch.save(rng_state(), tmp / "rng.pt")
        _test_pause()
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        (tmp / STATE_FILE).write_text(json.dumps(dict(state, step=step), indent=1))
        with open(tmp / STATE_FILE, "rb") as fh:
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
        _test_pause()
        if final.exists():  # a re-save of the same step: the old copy stays listable until the new one is in place
            old = root / f"{OLD_PREFIX}{final.name}-{os.getpid()}"
            final.rename(old)
            _test_pause()
            tmp.rename(final)
            _fsync_dir(root)
            _remove(old)
        else:
            tmp.rename(final)
        _fsync_dir(root)
    except Exception as e:  # OSError, or RuntimeError / SafetensorError from the writers on a full disk
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_error(final, root, e) from None
    complete = checkpoint_dirs(root)
    for old in complete[:-max(1, keep)]:
        if old != final:
            _remove(old)
    return final


def _torch_load(path: Path, name: str):
    file = path / name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(file, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        raise CheckpointError(f"checkpoint {path}: {name} holds pickled objects other than tensors and numbers; "
                              "refused (loading it could run code). Delete this checkpoint directory to resume from "
                              "the previous one") from None


def load_checkpoint(path: Path) -> dict:
    """Read a complete checkpoint (tensors only; nothing pickled is executed)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {STATE_FILE}); it was never finished")
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing[0]}; delete it to resume from the previous one")
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("state.json has no integer step")
        out = {
            "state": state,
            "trainable": load_file(str(path / "trainable.safetensors")),
            "optimizer": _torch_load(path, "optimizer.pt"),
            "lr_scheduler": _torch_load(path, "lr_scheduler.pt"),
            "rng": _torch_load(path, "rng.pt"),
        }
        ema = path / "ema.safetensors"
        out["ema"] = load_file(str(ema)) if ema.is_file() else None
        own = path / "method.safetensors"
        out["method"] = load_file(str(own)) if own.is_file() else None
    except CheckpointError:
        raise
    except Exception as e:  # corrupt files: say which checkpoint, never a raw traceback
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}); delete it to resume from the "
                              f"previous one") from None
    return out
