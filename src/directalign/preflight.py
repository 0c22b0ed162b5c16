"""Checks that run before anything loads, so a mistake costs a second instead of a model load (or a minute of
download retries): ``train`` calls :func:`check` first.

In order: the run directory against ``--resume`` / ``--overwrite`` and whether it can be written; ``model.device``;
``run.tensorboard`` without its package; the model path (a local diffusers directory with every component, or a hub
id that is cached or reachable); ``model.height`` / ``model.width`` against the family's resolution multiple (read
from the VAE's config.json when the model is local or cached, see :class:`directalign.adapters.loading.Family`);
every path the reward reads (:func:`directalign.rewards.registry.reward_needs`: weights files, backbones,
tokenizers). Each failure is one :class:`~directalign.errors.UserError` line naming the key and the fix. What needs
the weights themselves (a truncated file, pickled code) is still found by the loaders.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

from . import hub
from .adapters.loading import FAMILIES, check_local_model, check_tiny_world_family, vae_config
from .engine.finetune import resolve_device
from .engine.rundir import check_run_dir
from .errors import TrainingError
from .rewards.loading import has_tokenizer
from .rewards.registry import Need, RewardError, reward_needs
from .world_paths import generator_dir


def check(cfg, resume: bool = False, overwrite: bool = False) -> None:
    """Everything about ``cfg`` that can be checked without loading a model; raises a one-line UserError."""
    check_run_dir(cfg.run.output_dir, resume, overwrite)
    check_writable(cfg.run.output_dir)
    resolve_device(cfg.model.device)
    check_tensorboard(cfg.run)
    avail = hub.Availability()
    model_dir = check_model(cfg.model, avail)
    check_resolution(cfg.model, model_dir)
    for need in reward_needs(cfg.reward):
        check_need(need, avail)


# ---------------------------------------------------------------------------------------------------- run
def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return candidate
    return Path(".")


def check_writable(output_dir: str | Path) -> None:
    """The run directory, or the nearest folder above it that exists, accepts a new entry: a probe directory is
    made there and removed (a mode check alone would pass as root on a read-only or virtual filesystem)."""
    d = Path(output_dir).expanduser()
    base = _nearest_existing(d)
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(base))
        os.rmdir(tempfile.mkdtemp(prefix=".directalign-probe-", dir=base))
    except OSError as e:
        raise TrainingError(f"cannot write to run directory {str(output_dir)!r} ({e.strerror or e}); choose a "
                            "writable run.output_dir") from None


def check_tensorboard(run_cfg) -> None:
    if run_cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise TrainingError("run.tensorboard=true needs the tensorboard package, which is not installed; "
                            "pip install directalign[tensorboard], or set run.tensorboard=false")


# ---------------------------------------------------------------------------------------------------- model
def check_model(model_cfg, avail: hub.Availability) -> Path | None:
    """The local folder ``model.path`` resolves to (the tiny world, a directory, a cached snapshot), or None for a
    hub id that will be downloaded."""
    path = model_cfg.path
    if path == "tiny-world":
        check_tiny_world_family(model_cfg)
        return generator_dir()  # FileNotFoundError (one line) when the world's weights are missing
    if hub.is_local(path):
        return check_local_model(path, model_cfg.family)
    snapshot = avail.resolve("model.path", path)
    if snapshot is not None:
        try:
            check_local_model(snapshot, model_cfg.family, key=f"model.path {path!r} (cached copy)")
        except TrainingError as e:
            raise TrainingError(f"{e}; the cached copy is incomplete: download it again, or point model.path at "
                                "a complete local copy") from None
    return snapshot


def check_resolution(model_cfg, model_dir: Path | None) -> None:
    family = FAMILIES[model_cfg.family]
    multiple = family.resolution_multiple(vae_config(model_dir))
    for side in ("height", "width"):
        value = getattr(model_cfg, side)
        if value % multiple:
            raise TrainingError(f"model.{side}={value} is not a multiple of {multiple} (VAE factor x 2x2 "
                                f"packing); use {max(1, value // multiple) * multiple}")


# ---------------------------------------------------------------------------------------------------- reward
def _local(need: Need, avail: hub.Availability) -> Path | None:
    """The local folder or file ``need`` names (a cached snapshot for a hub id), None when it will download."""
    if need.role == "file" or hub.is_local(need.value):
        p = Path(need.value).expanduser()
        if not p.exists():
            what = "the weights file" if need.role == "file" else "a folder saved with save_pretrained or a hub id"
            raise RewardError(f"{need.key} {need.value!r} does not exist; give {what}")
        return p
    return avail.resolve(need.key, need.value)


def check_need(need: Need, avail: hub.Availability) -> None:
    """One path a reward reads: it exists (or is cached / reachable) and has the right shape, cheaply."""
    local = _local(need, avail)
    if local is None:
        return
    if need.role == "file":
        if not local.is_file():
            raise RewardError(f"{need.key} {need.value!r} is a directory; give the weights file itself")
        return
    if not local.is_dir():
        raise RewardError(f"{need.key} {need.value!r} is a file; give a folder saved with save_pretrained or a hub "
                          "id")
    if need.role == "tokenizer":
        if has_tokenizer(local):
            return
        if need.fallback:
            check_need(Need("reward.tokenizer", need.fallback, "tokenizer"), avail)
            return
        raise RewardError(f"{need.key} {need.value!r} holds no tokenizer; set reward.tokenizer to a tokenizer "
                          "folder or hub id")
    if need.check is not None:
        try:
            need.check(local)
        except ValueError as e:
            raise RewardError(f"{need.key}: {hub.clean_message(e)}") from None
