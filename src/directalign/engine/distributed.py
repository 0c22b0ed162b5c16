"""torch.distributed plumbing: process group from torchrun / accelerate environment variables, DDP for LoRA,
FSDP2 (``fully_shard``) for full fine-tuning, and the collectives the trainer needs.

A single process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) never touches torch.distributed. With several processes the
backend is NCCL on CUDA and gloo on CPU (how the tests run two processes on one machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device_preference: str = "auto") -> DistInfo:
    """Initialise the default process group when launched by torchrun/accelerate; a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_preference != "cpu"
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def device_for(info: DistInfo, preference: str) -> torch.device:
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    if preference.startswith("cuda:") and not info.enabled:
        return torch.device(preference)
    return torch.device("cuda", info.local_rank)


def all_reduce_mean(value: float, info: DistInfo, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / info.world_size


def all_reduce_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Average gradients across ranks (what DDP does in its backward hooks), in one flat buffer.

    Used for LoRA, whose few parameters make a single all-reduce per step cheaper than DDP's bucketing and keep the
    model an ordinary module (peft export, checkpointing and gradient checkpointing need no unwrapping).
    """
    if not info.enabled:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset : offset + n].view_as(p).clone()
        offset += n


def uses_fsdp(finetune: str, strategy: str, info: DistInfo) -> bool:
    """Whether this run shards the transformer with FSDP2: full fine-tuning on several ranks unless
    ``train.distributed=replicate`` (LoRA always replicates: its weights are a few MB)."""
    return info.enabled and finetune == "full" and strategy in ("auto", "fsdp")


def shard_full_model(transformer, info: DistInfo, compute_dtype: torch.dtype | None = None,
                     block_names: tuple[str, ...] = ("transformer_blocks", "single_transformer_blocks")):
    """FSDP2 (``fully_shard``): every transformer block is its own unit (gathered just before it runs and freed
    after), then the root for the embeddings and output layers. Parameters become DTensors sharded on dim 0.
    ``block_names``: the transformer's ModuleLists of blocks (an adapter's ``fsdp_block_names``; FLUX's by default).
    ``compute_dtype`` (bf16 for ``train.mixed_precision=bf16``): blocks compute with parameters gathered in that
    dtype and gradients are reduced in float32 onto the shards, which keep the weights' dtype."""
    if not info.enabled:
        return transformer
    from torch.distributed.fsdp import fully_shard

    from .precision import fsdp_policy

    policy = fsdp_policy(compute_dtype)
    for name in block_names:
        for block in getattr(transformer, name, None) or []:
            fully_shard(block, mp_policy=policy)
    fully_shard(transformer, mp_policy=policy)
    return transformer


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor (a collective: every rank calls it), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``full`` laid out like ``param``: this rank's shard when ``param`` is a DTensor (no communication)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                 src_data_rank=None)
    return full.to(param.device, param.dtype)


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # every rank receives the whole tensors (cpu_offload would keep them on rank 0 only)
    return StateDictOptions(full_state_dict=True, cpu_offload=False)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP2 model, on every rank (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return {k: v.detach().cpu() for k, v in get_model_state_dict(model, options=_full_options()).items()}


def load_full_model_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load an unsharded state dict (as written by any world size) into an FSDP2 model; every rank passes it."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    result = set_model_state_dict(model, state, options=_full_options())
    if result.missing_keys or result.unexpected_keys:
        raise KeyError((result.missing_keys or result.unexpected_keys)[0])


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, names: list[str]) -> dict:
    """The optimizer state of an FSDP2 model, unsharded and in ``optimizer.state_dict()``'s own layout (parameters
    numbered in ``names`` order), so one checkpoint format serves every world size and strategy. A collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    sd = get_optimizer_state_dict(model, optimizer, options=_full_options())
    index = {n: i for i, n in enumerate(names)}
    state = {index[n]: {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in s.items()}
             for n, s in sd["state"].items()}
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, sd: dict,
                              names: list[str]) -> None:
    """Inverse of :func:`full_optimizer_state`: shard a numbered, unsharded optimizer state onto this rank."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    by_name = {"state": {names[int(i)]: s for i, s in sd["state"].items()},
               "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in sd["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=_full_options())


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def destroy(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
