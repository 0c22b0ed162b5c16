"""Host memory between training steps: hand the C heap's freed pages back to the operating system.

A training step allocates and frees tens to hundreds of MB of tensor storage on the CPU (the rollout's activations,
the branches' autograd graphs, the first step's optimizer state). glibc's malloc keeps freed heap memory in its
arenas (and, after large frees, raises its mmap threshold so later large blocks come from those arenas too), so the
process's resident set stays at the step's high-water mark although the tensors are gone. ``malloc_trim(0)``
returns the free pages of every arena to the kernel (glibc >= 2.8, ``man 3 malloc_trim``); it frees nothing that is
in use. Measured on the FLUX-shaped tiny world (``benchmarks/official_step_memory.py``).

On other C libraries (musl, macOS, Windows) there is no such call and :func:`release_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import platform

_TRIM = None  # cached: the malloc_trim function, or False where there is none


def _malloc_trim():
    """glibc's ``malloc_trim`` (``int malloc_trim(size_t pad)``), or None on another C library."""
    global _TRIM
    if _TRIM is None:
        _TRIM = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                fn = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):
                fn = None
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
                _TRIM = fn
    return _TRIM or None


def release_freed_memory() -> bool:
    """Return the freed pages of the C heap to the OS (glibc ``malloc_trim(0)``); a no-op elsewhere.

    Returns True when memory was released, False when there was nothing to release or no way to do it. Costs a walk
    over the heap's free lists (milliseconds), so call it at boundaries that free much (after the first step, after
    an evaluation), not every step.
    """
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def session_prompts(sampler, start: int, end: int) -> list[str]:
    """The distinct prompts (sorted) that ``sampler`` hands this rank in steps ``[start, end)``."""
    per_step = sampler.batch_size * sampler.world_size
    if (end - start) * per_step >= len(sampler.prompts) + per_step:  # a whole epoch at least: every prompt
        return sorted(set(sampler.prompts))
    return sorted({p for step in range(start, end) for p in sampler.batch(step)})


def precompute_prompt_embeddings(adapter, prompts: list[str], batch_size: int) -> int:
    """Fill the adapter's per-prompt embedding cache for ``prompts`` before the first step, ``batch_size`` at a
    time, then hand the text encoders' freed activations back to the OS; returns the number of prompts encoded.

    The official SRPO code encodes every prompt in a preprocessing pass (``fastvideo/data_preprocess/
    preprocess_flux_embedding.py`` at Tencent-Hunyuan/SRPO@81e58984) so its training step only loads them; encoding
    here keeps the text encoders' activations (T5 at 512 tokens: 12.9 MiB on the FLUX-shaped tiny world) out of
    every step. The cache ends the same as after the steps would have filled it.
    """
    for i in range(0, len(prompts), batch_size):
        adapter.encode_prompts(prompts[i : i + batch_size])
    release_freed_memory()
    return len(prompts)
