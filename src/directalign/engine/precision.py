"""``train.mixed_precision``: where the transformer computes in bf16 while its trainable weights stay float32.

- One process or replicated ranks: the transformer's forward runs under ``torch.autocast`` on its own device
  (CUDA or CPU). Matmuls and convolutions run in bf16; the parameters, their gradients and Adam's moments stay in
  the weights' dtype (``model.dtype``, float32 for master weights), as in the official FSDP + bf16 autocast run.
- FSDP2: ``fully_shard``'s ``MixedPrecisionPolicy`` all-gathers the parameters in bf16 for compute and
  reduce-scatters the gradients in float32 onto the float32 shards.
"""

from __future__ import annotations

import torch

COMPUTE_DTYPES = {"no": None, "bf16": torch.bfloat16}


def compute_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype the transformer computes in (``None``: its weights' own dtype)."""
    return COMPUTE_DTYPES[mixed_precision]


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
