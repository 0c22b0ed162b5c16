"""Small shims over library versions and noisy defaults."""

from __future__ import annotations

import torch


def dtype_kwargs(dtype: torch.dtype) -> dict:
    """diffusers >= 0.36 takes ``dtype=`` in from_pretrained and deprecates ``torch_dtype=``; older ones only
    know ``torch_dtype=``."""
    from diffusers.pipelines import pipeline_utils

    return {"dtype": dtype} if hasattr(pipeline_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def quiet_loading() -> None:
    """No per-file loading progress bars or class-type warnings from diffusers / transformers."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.set_verbosity_error()
