"""FLOPs and activation memory of a training step's differentiable graph, measured by running the real modules.

Both measurements run the real diffusers / transformers modules, on meta tensors for the published models (no
memory, no weights) or on real tensors for the tiny ones:

* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions and attention, 2 FLOPs per
  multiply-add), per top-level module and for forward + backward, so a checkpointed block's recomputation and
  LoRA's extra matmuls count as they run.
* Memory: :class:`LiveBytes`, a ``TorchDispatchMode`` that adds up the bytes of every storage an operator creates
  and subtracts them when the storage is freed (a weak-reference finalizer), and keeps the peak. It is the
  allocator's view without a caching allocator's rounding or fragmentation: on a real GPU add the framework's own
  overhead (CUDA context, cuBLAS / NCCL workspaces; ``estimate.RESERVE_GB``). Parameters and their gradients are
  not counted here (each trainable parameter's gradient is dropped as soon as it is accumulated): the estimate adds
  weights, gradients and optimizer state from the parameter counts. Attention runs the fused kernel's op
  (:func:`fused_attention`), which keeps O(tokens) for the backward pass as GPU flash / memory-efficient kernels do.

Checked against the C allocator's in-use bytes of a real tiny SRPO step on CPU in ``tests/plan/test_plan.py``.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from . import probes, reward_models


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created inside the context and still alive (``current``), and their peak."""

    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._external: set[int] = set()  # storages made outside (parameters, inputs): their views cost nothing

    def _free(self, key: int) -> None:
        self.current -= self._sizes.pop(key, 0)

    def mark(self) -> int:
        """The bytes alive now (a checkpoint between stages)."""
        return self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        for t in tree_flatten((args, kwargs))[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._sizes and key not in self._external:
                    self._external.add(key)
                    weakref.finalize(storage, self._external.discard, key)
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self._sizes and key not in self._external:
                    self._sizes[key] = storage.nbytes()
                    self.current += self._sizes[key]
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


@contextlib.contextmanager
def fused_attention():
    """Within the block, ``F.scaled_dot_product_attention`` on meta tensors without a mask runs the fused (flash)
    kernel's own op, which keeps only the output and the log-sum-exp for the backward pass, as the GPU kernels and
    CPU's fused SDPA do; on meta tensors SDPA otherwise decomposes into the math path and materialises the
    (heads x tokens x tokens) matrix, which no GPU run keeps. (A global swap rather than a ``TorchFunctionMode``:
    gradient checkpointing recomputes blocks in the backward pass, where a mode is not active.)"""
    original = F.scaled_dot_product_attention
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")

    def sdpa(*args, **kwargs):
        a = dict(zip(names, args), **kwargs)
        q, v = a["query"], a["value"]
        if (a.get("attn_mask") is None and not a.get("enable_gqa") and q.device.type == "meta"
                and q.shape[-1] == v.shape[-1]):
            return torch.ops.aten._scaled_dot_product_flash_attention(
                q, a["key"], v, float(a.get("dropout_p", 0.0)), bool(a.get("is_causal", False)), False,
                scale=a.get("scale"))[0]
        return original(*args, **kwargs)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@dataclass
class GraphCost:
    """One differentiable graph of ``rows`` images: FLOPs (forward only, and forward + backward per part) and the
    activation memory (bytes alive after the transformer's forward, and the peak over forward and backward)."""

    rows: int
    transformer_forward: float
    transformer_train: float
    vae_forward: float
    vae_train: float
    reward_forward: float
    reward_train: float
    retained_after_forward: int
    peak_bytes: int
    nograd_peak_bytes: int


def _drop_grads(params: list[torch.nn.Parameter]) -> list:
    """Free each trainable parameter's gradient as soon as it is accumulated (the estimate counts gradients
    separately), so the graph's peak holds activations only."""
    def clear(p):
        p.grad = None

    return [p.register_post_accumulate_grad_hook(clear) for p in params]


class _NoCount:
    """Stands in for ``FlopCounterMode`` in the memory run."""

    def get_total_flops(self) -> int:
        return 0


def _graph(transformer, probe, shapes, dtype, device, vae, vae_checkpointing, reward, decode_in_graph, params,
           fc, live) -> dict:
    """One differentiable graph, forward then backward in stages (reward, VAE, transformer: the order autograd runs
    them), reading the FLOP counter ``fc`` and the memory tracker ``live`` between stages."""
    f = {"transformer_forward": 0, "vae_forward": 0, "reward_forward": 0, "reward_train": 0, "vae_train": 0}
    out = probe(transformer, shapes, dtype, device)
    f["transformer_forward"] = fc.get_total_flops()
    f["retained_after_forward"] = live.mark() if live is not None else 0
    if decode_in_graph and vae is not None:
        latents = out if out.dim() in (4, 5) else _unpack(out, shapes)  # 5-D: a video's latent frames
        del out
        images = probes.decode(vae, shapes.latent_hw, shapes.rows, dtype, device, vae_checkpointing,
                               latents=latents.to(next(vae.parameters()).dtype))
        f["vae_forward"] = fc.get_total_flops() - f["transformer_forward"]
        if reward is not None:
            score = reward_models.score(reward, images)
            mark = fc.get_total_flops()
            f["reward_forward"] = mark - f["transformer_forward"] - f["vae_forward"]
            (grad_images,) = torch.autograd.grad(score.float().mean(), [images])
            f["reward_train"] = f["reward_forward"] + fc.get_total_flops() - mark
            del score
        else:
            grad_images = torch.full_like(images, 1.0 / images.numel())
        mark = fc.get_total_flops()
        (grad_latents,) = torch.autograd.grad(images, [latents], grad_images)
        f["vae_train"] = f["vae_forward"] + fc.get_total_flops() - mark
        del images, grad_images
        mark = fc.get_total_flops()
        if params:
            latents.backward(grad_latents)
        del latents, grad_latents
    else:
        loss = out.float().square().mean()
        del out
        mark = fc.get_total_flops()
        if params:
            loss.backward()
        del loss
    f["transformer_train"] = f["transformer_forward"] + fc.get_total_flops() - mark
    return f


def graph_cost(transformer, probe, shapes: probes.Shapes, dtype: torch.dtype, device, vae=None,
               vae_checkpointing: bool = False, reward=None, decode_in_graph: bool = True,
               fused: bool = True) -> GraphCost:
    """Run one rollout call (no grad) and one differentiable graph (transformer -> VAE decode -> reward -> backward
    when ``decode_in_graph``; the transformer alone otherwise) and measure both: FLOPs in one run, memory in another
    (``FlopCounterMode``'s module hooks keep recomputed checkpoint tensors alive a while, which would inflate the
    peak). Trainable parameters are those with ``requires_grad`` (LoRA or full fine-tuning set up by the caller);
    gradient checkpointing is whatever the modules were set to. ``fused=False`` keeps SDPA's own path (on meta: the
    math path, whose backward does not recompute the attention scores as the fused kernels' does)."""
    attention = fused_attention if fused else contextlib.nullcontext
    params = [p for p in transformer.parameters() if p.requires_grad]
    args = (transformer, probe, shapes, dtype, device, vae, vae_checkpointing, reward, decode_in_graph, params)
    with torch.no_grad(), attention(), LiveBytes() as nograd:
        probe(transformer, shapes, dtype, device)
    hooks = _drop_grads(params)
    try:
        with attention(), FlopCounterMode(display=False) as fc:
            flops = _graph(*args, fc, None)
        gc.collect()
        with attention(), LiveBytes() as live:
            memory = _graph(*args, _NoCount(), live)
    finally:
        for h in hooks:
            h.remove()
    return GraphCost(shapes.rows, flops["transformer_forward"], flops["transformer_train"], flops["vae_forward"],
                     flops["vae_train"], flops["reward_forward"], flops["reward_train"],
                     memory["retained_after_forward"], live.peak, nograd.peak)


def _unpack(tokens: torch.Tensor, s: probes.Shapes) -> torch.Tensor:
    """Packed (B, (h/2)(w/2), 4C) latents -> (B, C, h, w), as FluxPipeline._unpack_latents."""
    b, _, d = tokens.shape
    h, w = s.latent_hw
    c = d // 4
    x = tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def forward_cost(module, fn) -> tuple[float, int]:
    """(FLOPs, peak bytes) of ``fn()`` without gradient (e.g. one VAE decode or reward call of a no-grad pass)."""
    with torch.no_grad(), fused_attention(), FlopCounterMode(display=False) as fc, LiveBytes() as live:
        fn()
    return float(fc.get_total_flops()), live.peak
