"""``train.mixed_precision``: where the transformer computes in bf16 while its trainable weights stay float32.

- One process or replicated ranks: the transformer's forward runs under ``torch.autocast`` on its own device
  (CUDA or CPU). Matmuls and convolutions run in bf16; the parameters, their gradients and Adam's moments stay in
  the weights' dtype (``model.dtype``, float32 for master weights), as in the official FSDP + bf16 autocast run.
- FSDP2: ``fully_shard``'s ``MixedPrecisionPolicy`` all-gathers the parameters in bf16 for compute and
  reduce-scatters the gradients in float32 onto the float32 shards.
- Master weights (:func:`float32_master_weights`): whatever dtype the model loads in (``model.dtype: bfloat16``),
  the trainable parameters, their gradients and Adam's moments are float32; the model then computes in the dtype it
  loaded in (autocast or FSDP2's ``param_dtype``), as mixed-precision training keeps a float32 master copy
  (Micikevicius et al. 2018, arXiv 1710.03740) and the official SRPO run does (``--master_weight_type fp32`` with
  bf16 autocast; Tencent-Hunyuan/SRPO, fastvideo/SRPO.py).
"""

from __future__ import annotations

import torch

from .config import DTYPE_NAMES

COMPUTE_DTYPES = {"no": None, "bf16": torch.bfloat16}
# the dtype names of the config (`model.dtype`, `reward.dtype`) -> torch dtypes; the one map every caller uses
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def compute_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype the transformer computes in (``None``: its weights' own dtype)."""
    return COMPUTE_DTYPES[mixed_precision]


def float32_master_weights(module: torch.nn.Module) -> torch.dtype | None:
    """Cast every trainable (``requires_grad``) parameter of ``module`` below float32 precision to float32, in place.

    Why: AdamW moves a weight by about ``lr`` per step (its normalised step ``m / (sqrt(v) + eps)`` is of order 1),
    and bfloat16 keeps 8 significant bits, so a weight ``|w| >= 2^e`` has a half-ulp of ``2^(e-8)``: at lr 5e-6 every
    bf16 weight with ``|w| >= 2^-9`` (about 0.002, i.e. nearly all of FLUX's) rounds back to itself and never moves.
    Mixed-precision training therefore keeps float32 master weights and computes in the low precision (Micikevicius
    et al. 2018, arXiv 1710.03740); the official SRPO run wraps the transformer in FSDP with ``master_weight_type``
    fp32 under bf16 autocast (Tencent-Hunyuan/SRPO, fastvideo/SRPO.py).

    The parameters stay the same ``Parameter`` objects (their ``.data`` is replaced, as ``Module.to`` does), so peft's
    LoRA layers and any list of them stay valid; existing gradients are cast along. Frozen parameters and buffers keep
    their dtype (a LoRA base stays bf16; peft casts the adapter's input to the adapter weights' dtype), and float32 or
    float64 parameters are left as they are. Call it before the optimizer, any EMA copy and FSDP2's ``fully_shard``
    (it refuses already sharded DTensor parameters: FSDP2 keeps its own views of them).

    Returns the dtype the cast parameters had (e.g. ``torch.bfloat16``), for the caller to compute in (see
    :func:`autocast_forward`, :func:`fsdp_policy`), or ``None`` when nothing was cast (no trainable parameter below
    float32). Raises ``ValueError`` if the trainable parameters mix several low-precision dtypes.
    """
    low = [p for p in module.parameters()
           if p.requires_grad and p.is_floating_point() and torch.finfo(p.dtype).bits < 32]
    if not low:
        return None
    if any(hasattr(p, "device_mesh") for p in low):
        raise ValueError("float32_master_weights: the parameters are already sharded (DTensor); call it before "
                         "fully_shard")
    dtypes = {p.dtype for p in low}
    if len(dtypes) > 1:
        raise ValueError(f"float32_master_weights: trainable parameters mix several low-precision dtypes "
                         f"{sorted(map(str, dtypes))}")
    with torch.no_grad():
        for p in low:
            p.data = p.data.to(torch.float32)
            if p.grad is not None:
                p.grad = p.grad.to(torch.float32)
    return dtypes.pop()


def autocast_forward(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Run ``module``'s forward under autocast to ``dtype`` on the device of its parameters.

    The backward pass runs outside the context, as autocast asks; gradient checkpointing replays the recorded
    autocast state when it recomputes a block. Returns ``module`` (changed in place)."""
    device_type = next(module.parameters()).device.type
    module.forward = torch.autocast(device_type=device_type, dtype=dtype)(module.forward)
    return module


def restore_forward(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`autocast_forward` (a no-op on a module it did not wrap)."""
    module.__dict__.pop("forward", None)
    return module


def fsdp_policy(dtype: torch.dtype | None):
    """FSDP2's mixed-precision policy for ``dtype`` (``None``: the default, everything in the weights' dtype)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if dtype is None:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
