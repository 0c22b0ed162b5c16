"""Guarded loading of every reward's weights: the transformers models (CLIP, CLIP vision towers, SigLIP) and the
plain weights files (``.pt`` / ``.pth`` / ``.bin`` / ``.safetensors``: HPSv2, ImageReward, the aesthetic heads).

``transformers``' ``from_pretrained`` fills weights it does not find with fresh random values and only logs it; a
reward with random weights would train towards noise without any error. :func:`load_checked` turns that, and every
other way a checkpoint can be wrong, into a one-line ``ValueError``. :func:`load_weights_file` is the one reader of a
weights file: safetensors, or ``torch.load(weights_only=True)``, which refuses pickled code without running it
(https://pytorch.org/docs/stable/generated/torch.load.html); whatever is wrong with the file becomes one
:class:`WeightsFileError` line naming the file and the fix. This module imports no other reward module, so every
reward module can use it.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError
from ..hub import refused_pickle



class WeightsFileError(UserError, ValueError):
    """A weights file that cannot be used: missing, corrupt, not a state dict, or holding pickled code (refused)."""


def _first(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    return type(e).__name__ if "weights_only" in first else first  # never pass on advice to unpickle freely


def _refused_global(e: BaseException) -> str:
    m = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f" (it references {m.group(1)})" if m else ""


def load_weights_file(path: str | Path) -> dict:
    """The top-level object of a weights file: ``.safetensors`` through safetensors, anything else through
    ``torch.load(weights_only=True, map_location="cpu")``. Raises :class:`WeightsFileError` with one line naming
    the file and the fix; a pickle holding code is refused before any of it runs."""
    import pickle

    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise WeightsFileError(f"weights file {str(path)!r} {what}; give the path of the weights file itself")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsFileError(f"weights file {str(path)!r} is not a readable safetensors file "
                                   f"({_first(e)}); download it again") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not refused_pickle(e):  # a damaged pickle stream, not a refused object
            detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
            raise WeightsFileError(f"weights file {str(path)!r} is not a readable PyTorch weights file (truncated or "
                                   f"corrupt: {detail.group(1)[:160] if detail else 'not a pickle stream'}); "
                                   "download it again or give a .safetensors copy") from None
        raise WeightsFileError(
            f"weights file {str(path)!r} holds pickled Python objects besides tensors{_refused_global(e)}: refused, "
            "nothing in it ran; get a copy saved as .safetensors, or one that holds only its state dict (tensors, "
            "saved with torch.save(model.state_dict(), path))") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError, ImportError, IndexError) as e:
        raise WeightsFileError(f"weights file {str(path)!r} is not a readable PyTorch weights file (truncated or "
                               f"corrupt: {_first(e)}); download it again or give a .safetensors copy") from None
    if not isinstance(obj, dict):
        raise WeightsFileError(f"weights file {str(path)!r} holds a {type(obj).__name__}, not a state dict; re-save "
                               "it with torch.save(model.state_dict(), path) or as .safetensors")
    return obj


def check_clip_dir(path: str | Path) -> None:
    """For a local path: it exists and its config.json declares a CLIP model (cheap, before any weights load)."""
    text = str(path)
    p = Path(text).expanduser()
    if not (text.startswith((".", "/", "~")) or p.exists()):
        return  # a hub id: checked after loading
    if not p.is_dir():
        raise ValueError(f"{text} does not exist or is not a directory; give a transformers CLIPModel directory")
    check_model_type(p, ("clip",), "a CLIP model (a transformers CLIPModel checkpoint)")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model")


def has_tokenizer(folder: str | Path) -> bool:
    """``folder`` holds a saved tokenizer (any of the files transformers' tokenizers save)."""
    return any((Path(folder) / name).is_file() for name in TOKENIZER_FILES)


def check_model_type(path: str | Path, model_types: tuple[str, ...], what: str) -> None:
    """A local folder whose config.json declares one of ``model_types`` (cheap, before any weights load)."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} has no config.json, so it is not a transformers model directory; give {what} "
                         "saved with save_pretrained")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{config} is not a valid JSON config; give {what}") from None
    if model_type not in model_types:
        raise ValueError(f"{path} holds a {model_type or 'non-transformers'} model, not {what} (config.json "
                         f"model_type must be one of {', '.join(model_types)})")


def load_checked(cls, path, **kwargs):
    """``cls.from_pretrained(path)`` that fails with one line instead of returning a model with freshly initialised
    weights (a reward with random weights would train towards noise without any error): a local directory of
    another architecture, missing, truncated or unsafe weights (pickled code is refused by transformers'
    ``weights_only`` loading; nothing in it runs) all raise ``ValueError``. Unused checkpoint weights (a CLIP text
    tower under a vision-only model) are expected and not reported."""
    from transformers.utils import logging as tlog

    if cls.__name__ == "CLIPModel":
        check_clip_dir(path)  # a local directory must declare model_type "clip"
    level = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        model, info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except Exception as e:  # UnpicklingError (refused pickled code), SafetensorError (corrupt file), ...
        refused = refused_pickle(e)  # also when transformers re-raises it as an OSError
        if isinstance(e, (OSError, ValueError)) and not refused:
            raise
        first = _first(e)
        if refused:
            first = "a pickled weights file holds objects other than tensors; refused, nothing in it ran"
        raise ValueError(f"{path} holds unreadable or unsafe weights ({type(e).__name__}: {first}); give a "
                         "checkpoint saved as safetensors") from None
    finally:
        tlog.set_verbosity(level)
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    mismatched = info.get("mismatched_keys", [])
    if missing or mismatched:
        bad = missing[:2] or [m[0] if isinstance(m, (tuple, list)) else m for m in mismatched[:2]]
        raise ValueError(f"{path} does not hold the weights a {cls.__name__} needs ({', '.join(map(str, bad))} "
                         "missing or of another shape)")
    return model


def hf_dtype(dtype) -> dict:
    """transformers >= 4.56 takes ``dtype=`` in from_pretrained; older versions ``torch_dtype=``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}
