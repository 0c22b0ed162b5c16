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


def shard_full_model(transformer, info: DistInfo):
    """FSDP2 sharding of every transformer block and the root, for full fine-tuning across ranks."""
    if not info.enabled:
        return transformer
    from torch.distributed.fsdp import fully_shard

    for block in list(getattr(transformer, "transformer_blocks", [])) + list(
            getattr(transformer, "single_transformer_blocks", [])):
        fully_shard(block)
    fully_shard(transformer)
    return transformer


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def destroy(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
