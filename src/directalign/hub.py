"""Where a model path lives (a local folder or a Hugging Face hub id) and whether a hub id can be loaded right now.

A hub id can be loaded when the hub is reachable, or, offline (``HF_HUB_OFFLINE=1`` or no network), when a snapshot
of it sits in the local Hugging Face cache (``huggingface_hub.snapshot_download(local_files_only=True)``, see
https://huggingface.co/docs/huggingface_hub/guides/manage-cache). Knowing that before anything loads turns a minute of
download retries into one line that says how to provide a local copy.

Also :func:`clean_message`: the first line of a library's exception, without the advice that only makes sense with a
traceback on screen ("check out the root cause in the stacktrace above"), and :func:`refused_pickle`: whether a
library's error comes from ``torch.load(weights_only=True)`` refusing pickled code.

This module imports nothing of directalign but :mod:`directalign.errors`, so every loader can use it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import UserError

_TRUE = {"1", "on", "yes", "true"}
# Sentences that point at a traceback the one-line error does not show.
_TRACEBACK_ADVICE = re.compile(r"[^.;()]*\b(stack ?trace|traceback)\b (above|below)[^.;()]*[.;]?", re.IGNORECASE)


# torch's weights-only unpickler refusing an object (rather than failing on a damaged stream)
_REFUSED_PICKLE = re.compile(r"GLOBAL|Can only (build|create)|allowlisted|must be imported")


def refused_pickle(e: BaseException) -> bool:
    """``e``, or an exception it was raised from, is ``torch.load(weights_only=True)`` refusing a pickled object
    other than tensors (pickled code: nothing of it ran)."""
    import pickle

    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, pickle.UnpicklingError) and _REFUSED_PICKLE.search(str(e)):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class HubError(UserError):
    """A model or reward path that is neither a local folder or file nor a hub id that can be loaded now."""


def clean_message(e: BaseException | str, limit: int = 400) -> str:
    """The first line of ``e`` without references to a stack trace the user does not see."""
    text = str(e).strip()
    first = (text.splitlines() or [""])[0] if text else ""
    first = _TRACEBACK_ADVICE.sub("", first).strip()
    first = re.sub(r"\(\s*\)", "", first)
    first = re.sub(r"\s+([.;,])", r"\1", first).rstrip(" ;,")
    if not first:
        first = type(e).__name__ if isinstance(e, BaseException) else "unknown error"
    return first if len(first) <= limit else first[:limit - 3] + "..."


def is_local(text: str) -> bool:
    """``text`` names a local path: it exists, or it is spelled as one (``./x``, ``/x``, ``~/x``, ``x/y/z``)."""
    if Path(text).expanduser().exists() or text.startswith((".", "/", "~")) or "\\" in text:
        return True
    return not is_hub_id(text)


def is_hub_id(text: str) -> bool:
    """``org/name`` or ``name`` as the hub spells repository ids (and not an existing local path)."""
    if not text or Path(text).expanduser().exists():
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(text)
    except Exception:  # HFValidationError (a ValueError), or no huggingface_hub
        return False
    return text.count("/") <= 1


def offline() -> bool:
    """The hub is switched off (``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``)."""
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return True


def cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def reachable(timeout: float = 5.0) -> bool:
    """One short request to the hub endpoint (through the hub client's own session, so proxies apply): any answer
    means reachable; a refused connection, a DNS failure or a timeout means not."""
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception:  # httpx / requests connection errors, a socket refused by a sandbox, ...
        return False
    return True


def cached_snapshot(repo_id: str) -> Path | None:
    """The folder of the newest cached snapshot of ``repo_id`` (revision ``main``), or None. Never uses the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # LocalEntryNotFoundError, a broken cache entry, an invalid id
        return None


class Availability:
    """Resolves hub ids for one check: asks the network at most once, and only when a hub id is not cached."""

    def __init__(self):
        self._online: bool | None = None

    def online(self) -> bool:
        if self._online is None:
            self._online = not offline() and reachable()
        return self._online

    def resolve(self, key: str, repo_id: str) -> Path | None:
        """The cached snapshot of ``repo_id``; None when it is not cached but the hub is reachable (it will
        download). Raises :class:`HubError` (one line, naming ``key`` and how to provide a local copy) when it is
        neither cached nor reachable."""
        snap = cached_snapshot(repo_id)
        if snap is not None:
            return snap
        if self.online():
            return None
        why = "the hub is switched off (HF_HUB_OFFLINE=1)" if offline() else "the hub cannot be reached (no network)"
        raise HubError(f"{key} {repo_id!r} is not a local path and not in the local Hugging Face cache "
                       f"({cache_dir()}), and {why}; download it where there is network (hf download "
                       f"{repo_id} --local-dir DIR), copy DIR here and set {key}=DIR, or set HF_HOME to a cache that "
                       "holds it")
