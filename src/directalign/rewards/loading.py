"""Guarded loading of the transformers models under every reward (CLIP, CLIP vision towers, SigLIP).

``transformers``' ``from_pretrained`` fills weights it does not find with fresh random values and only logs it; a
reward with random weights would train towards noise without any error. :func:`load_checked` turns that, and every
other way a checkpoint can be wrong, into a one-line ``ValueError``. This module imports no other reward module, so
every reward module can use it.
"""

from __future__ import annotations

from pathlib import Path


def check_clip_dir(path: str | Path) -> None:
    """For a local path: it exists and its config.json declares a CLIP model (cheap, before any weights load)."""
    import json

    text = str(path)
    p = Path(text).expanduser()
    if not (text.startswith((".", "/", "~")) or p.exists()):
        return  # a hub id: checked after loading
    if not p.is_dir():
        raise ValueError(f"{text} does not exist or is not a directory; give a transformers CLIPModel directory")
    config = p / "config.json"
    if not config.is_file():
        raise ValueError(f"{text} has no config.json, so it is not a transformers model directory; give a "
                         "CLIPModel directory (saved with save_pretrained)")
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise ValueError(f"{config} is not a valid JSON config; give a CLIPModel directory") from None
    if model_type != "clip":
        raise ValueError(f"{text} holds a {model_type or 'non-transformers'} model, not a CLIP model (config.json "
                         "model_type must be 'clip'); point it at a CLIPModel checkpoint")


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
    except (OSError, ValueError):
        raise
    except Exception as e:  # UnpicklingError (refused pickled code), SafetensorError (corrupt file), ...
        import pickle

        first = (str(e).strip().splitlines() or [""])[0][:160]
        if isinstance(e, pickle.UnpicklingError):
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
