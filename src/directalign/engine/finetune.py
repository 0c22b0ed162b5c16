"""Fine-tuning setup: which weights train (LoRA or the whole transformer), their float32 master copies, FSDP2
sharding, the optimizer, the LR schedule, EMA, and checkpoint save / load of all of it.

Everything here works on the transformer module and the ``train`` section; nothing knows a method or a reward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import TrainingError
from . import checkpoint as ckpt
from . import distributed as dist_utils
from . import precision
from .precision import DTYPES  # noqa: F401  (re-exported: callers load weights in DTYPES[model.dtype])

DEVICE_NAMES = "cpu | cuda | cuda:N | auto | mps"


def resolve_device(name: str) -> torch.device:
    """``model.device`` as a torch device: ``auto`` (CUDA when available, else the CPU), ``cpu``, ``cuda``,
    ``cuda:N`` or ``mps``; anything else, or a device this machine does not have, is a one-line TrainingError."""
    import re

    match = re.fullmatch(r"(auto|cpu|mps|cuda)(?::(\d+))?", name.strip())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise TrainingError(f"model.device={name!r} is not a device directalign can use; choose one of "
                            f"{DEVICE_NAMES}")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"model.device={name!r} but no CUDA device is available; use model.device=cpu")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise TrainingError(f"model.device={name!r} but this machine has {count} CUDA device(s); use "
                                f"model.device=cuda:0 .. cuda:{count - 1}")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TrainingError(f"model.device={name!r} but no MPS (Apple GPU) device is available; use "
                            "model.device=cpu")
    return torch.device(name.strip())


def lr_lambda(schedule: str, warmup: int, total: int):
    """The LR multiplier at step ``step``: linear warmup, then constant, linear decay or cosine decay to 0."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _present_targets(module: torch.nn.Module, candidates) -> list[str]:
    names = [n for n, _ in module.named_modules()]
    return [c for c in candidates if any(n == c or n.endswith("." + c) for n in names)]


def apply_finetune_mode(t, adapter) -> list[torch.nn.Parameter]:
    """LoRA (peft) or full fine-tuning of the transformer per the ``train`` section ``t``; everything else frozen.
    Returns the trainable parameters."""
    transformer = adapter.transformer
    transformer.requires_grad_(False)
    if t.finetune == "lora":
        from peft import LoraConfig

        targets = list(t.lora_targets) or _present_targets(transformer, adapter.lora_target_modules)
        transformer.add_adapter(LoraConfig(r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout,
                                           target_modules=targets, init_lora_weights=True))
    else:
        transformer.requires_grad_(True)
    if t.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if t.vae_checkpointing:
        # some VAEs (Qwen-Image's) do not support diffusers' flag; their adapter provides its own
        enable = getattr(adapter, "enable_vae_checkpointing", adapter.vae.enable_gradient_checkpointing)
        enable()
    transformer.train()
    return [p for p in transformer.parameters() if p.requires_grad]


def trainable_state(finetune: str, transformer) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds: the LoRA adapter (peft keys) or the whole transformer."""
    if finetune == "lora":
        from peft.utils import get_peft_model_state_dict

        return get_peft_model_state_dict(transformer)
    return transformer.state_dict()


def load_trainable_state(finetune: str, transformer, state: dict[str, torch.Tensor], fsdp: bool = False) -> None:
    if finetune == "lora":
        from peft.utils import set_peft_model_state_dict

        result = set_peft_model_state_dict(transformer, state)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise TrainingError(f"checkpoint holds weights this model does not have ({unexpected[0]}); it belongs "
                                "to another model or LoRA setting")
    elif fsdp:
        try:
            dist_utils.load_full_model_state(transformer, state)
        except (KeyError, RuntimeError):
            raise TrainingError("checkpoint weights do not match this transformer; it belongs to another model") \
                from None
    else:
        missing, unexpected = transformer.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise TrainingError("checkpoint weights do not match this transformer; it belongs to another model")


def unsharded(cls, sharded, weights: dict[str, torch.Tensor]):
    """A plain ``cls`` module (the transformer's class before FSDP2 wrapped it) holding ``weights``."""
    module = cls.from_config(sharded.config)
    module.load_state_dict(weights)
    return module.to(device=sharded.device, dtype=sharded.dtype).eval().requires_grad_(False)


@dataclass
class FineTuning:
    """The trainable state of a run: parameters (float32 masters), optimizer, LR schedule and EMA."""

    t: object  # the train section
    adapter: object
    info: dist_utils.DistInfo
    fsdp: bool
    params: list
    named: list
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: dict | None
    plain_class: type
    loaded_dtype: torch.dtype | None = None  # the dtype the masters were cast from (None: they loaded float32)

    @classmethod
    def setup(cls, t, adapter, info: dist_utils.DistInfo) -> "FineTuning":
        params = apply_finetune_mode(t, adapter)
        transformer = adapter.transformer
        plain_class = type(transformer)
        # Float32 master weights whatever dtype the model loaded in; it then computes in that dtype (or bf16 when
        # train.mixed_precision asks), so a bf16 checkpoint trains as the official run does (fp32 master + bf16).
        loaded_dtype = precision.float32_master_weights(transformer)
        compute = precision.compute_dtype(t.mixed_precision) or loaded_dtype
        fsdp = dist_utils.uses_fsdp(t.finetune, t.distributed, info)
        if fsdp:
            dist_utils.shard_full_model(transformer, info, compute, getattr(
                adapter, "fsdp_block_names", ("transformer_blocks", "single_transformer_blocks")))
            params = [p for p in transformer.parameters() if p.requires_grad]  # now DTensor shards
        elif compute is not None:
            precision.autocast_forward(transformer, compute)
        optimizer = torch.optim.AdamW(params, lr=t.learning_rate, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                      weight_decay=t.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(t.lr_schedule, t.warmup_steps, t.steps))
        named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
        ema = {n: p.detach().clone() for n, p in named} if t.ema_decay > 0 else None
        return cls(t, adapter, info, fsdp, params, named, optimizer, scheduler, ema, plain_class, loaded_dtype)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.named]

    def update_ema(self) -> None:
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.named:
                    self.ema[n].lerp_(p.detach(), 1 - self.t.ema_decay)

    def restore(self, loaded: dict) -> None:
        """Weights, optimizer, LR schedule, RNG and EMA from a loaded checkpoint (written by any strategy)."""
        transformer = self.adapter.transformer
        load_trainable_state(self.t.finetune, transformer, loaded["trainable"], self.fsdp)
        if self.fsdp:
            dist_utils.load_full_optimizer_state(transformer, self.optimizer, loaded["optimizer"], self.names)
        else:
            self.optimizer.load_state_dict(loaded["optimizer"])
        self.scheduler.load_state_dict(loaded["lr_scheduler"])
        ckpt.set_rng_state(loaded["rng"])
        if self.ema is not None and loaded["ema"] is not None:
            self.ema = {n: dist_utils.like_param(loaded["ema"][n], p) for n, p in self.named}

    def save(self, root: Path, step: int, state: dict, keep: int, method_state: dict | None = None) -> Path | None:
        """Write a checkpoint of step ``step`` (a collective under FSDP2: every rank gathers, rank 0 writes);
        ``method_state``: the method's own tensors (whole, not sharded), saved as ``method.safetensors``."""
        transformer = self.adapter.transformer
        if self.fsdp:
            weights = dist_utils.full_model_state(transformer)
            opt_state = dist_utils.full_optimizer_state(transformer, self.optimizer, self.names)
            ema_state = {n: dist_utils.full_tensor(v) for n, v in self.ema.items()} if self.ema is not None else None
        else:
            weights, opt_state, ema_state = trainable_state(self.t.finetune, transformer), self.optimizer, self.ema
        path = None
        if self.info.is_main:
            path = ckpt.save_checkpoint(root, step, weights, opt_state, self.scheduler, state, ema=ema_state,
                                        keep=keep, method_state=method_state)
        dist_utils.barrier(self.info)
        return path

    def finalize(self) -> None:
        """After the last step: EMA weights into the model, and (rank 0) an ordinary module for evaluation and
        export; the held-out evaluation after training computes as the one before it did, in the weights' dtype."""
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.named:
                    p.copy_(self.ema[n])
        if self.fsdp:  # rank 0 evaluates and exports alone, so it gets an ordinary module with the gathered weights
            transformer = self.adapter.transformer
            weights = dist_utils.full_model_state(transformer)
            if self.info.is_main:
                setattr(self.adapter.pipe, getattr(self.adapter, "transformer_slot", "transformer"),
                        unsharded(self.plain_class, transformer, weights))
        else:
            precision.restore_forward(self.adapter.transformer)
        if self.loaded_dtype is not None and self.t.finetune == "full" and self.info.is_main:
            # back to the dtype the model loaded in: evaluation computes as the base model's did, export matches it
            self.adapter.transformer.to(self.loaded_dtype)
        self.adapter.transformer.eval()
