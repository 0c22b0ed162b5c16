"""The resource plan of a run configuration: parameters, FLOPs per update, memory per GPU, time bound and fit.

Every module is built from its ``config.json`` on the meta device (:mod:`.sources`), LoRA and checkpointing are set
up exactly as ``engine/finetune.apply_finetune_mode`` does, and one rollout call and one differentiable graph are run
on meta tensors at the config's resolution and text length (:mod:`.measure`). What a step runs comes from
:mod:`.work`. Memory per GPU, in GiB:

* weights: the transformer in ``model.dtype``, except trainable weights, which the engine keeps in float32
  (``engine/precision.float32_master_weights``: LoRA's adapter, or the whole transformer under full fine-tuning);
  the VAE and every text encoder in ``model.dtype`` (they stay on the device: the run encodes prompts as it meets
  them); the reward in ``reward.dtype`` (built as the reward kind runs it: :mod:`.reward_models`);
* gradients (float32) and AdamW's two moments (float32) of the trainable weights, and an EMA copy when enabled;
* FSDP2 (full fine-tuning on N > 1 GPUs, ``train.distributed`` auto / fsdp; ``engine/distributed.shard_full_model``
  shards each block and the root): float32 weights, gradients and optimizer state / N, plus the gathered
  compute-dtype parameters of the root and two blocks (the running one and the prefetched one) and one block's
  unsharded float32 gradient before its reduce-scatter;
* autocast copies: where trainable float32 weights compute in bf16 (``train.mixed_precision: bf16`` without FSDP),
  autocast keeps a bf16 copy of each weight it casts for the backward pass: all of them without gradient
  checkpointing, one block's with it;
* activations: the measured peak of one differentiable graph (and of a rollout call, if larger), times the calls a
  graph chains (DRaFT-K, AlignProp) unless the method checkpoints each call, and twice for a differentiable call
  with true classifier-free guidance;
* a fixed reserve (:data:`RESERVE_GB`) for the CUDA context, cuBLAS / NCCL workspaces and allocator slack.

Videos (Wan): the transformer runs every latent frame, the VAE decodes the whole clip (causal 3-D, every latent
frame, as ``adapters/wan.WanAdapter.decode``) and the reward scores every decoded frame and averages
(``rewards/video.py``): the VAE and reward FLOPs and activations of a differentiable graph are those of the whole
clip, measured by running it.

Time per update is a lower bound: the update's FLOPs at the GPU's peak dense bf16 throughput (:mod:`.gpus`); real
runs reach 30-60 % of it on large matmuls.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from functools import partial

import torch

from ..adapters.loading import FAMILIES
from ..engine.precision import DTYPES
from . import probes, reward_models
from .gpus import gpu as find_gpu
from .measure import forward_cost, graph_cost
from .sources import (
    PlanError,
    build_meta,
    component_config,
    components,
    count_params,
    pipeline_components,
)
from .work import work_of

RESERVE_GB = 2.0
GIB = 1024 ** 3


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def lora_targets(train_cfg, family: str, transformer) -> list[str]:
    """``train.lora_targets``, or the family adapter's ``lora_target_modules`` present in ``transformer`` (as
    ``apply_finetune_mode`` chooses them)."""
    from ..engine.finetune import _present_targets

    cls = FAMILIES[family].adapter_class()
    targets = cls.lora_target_modules
    if isinstance(targets, property):  # computed from the transformer (flux2: each single block's attn.to_out)
        targets = targets.fget(_AdapterView(cls, transformer))
    return list(train_cfg.lora_targets) or _present_targets(transformer, targets)


class _AdapterView:
    """What an adapter's ``lora_target_modules`` property reads: the class's attributes and the transformer."""

    def __init__(self, cls, transformer):
        self._cls, self.transformer = cls, transformer

    def __getattr__(self, name):
        return getattr(self._cls, name)


def setup_transformer(config: dict, train_cfg, family: str, dtype: torch.dtype, finetune: str):
    """The transformer on meta with LoRA or full fine-tuning and gradient checkpointing as the engine sets them."""
    t = build_meta(config, dtype)
    t.requires_grad_(False)
    if finetune == "lora":
        from peft import LoraConfig

        t.add_adapter(LoraConfig(r=train_cfg.lora_rank, lora_alpha=train_cfg.lora_alpha, lora_dropout=0.0,
                                 target_modules=lora_targets(train_cfg, family, t), init_lora_weights=True))
        for p in t.parameters():  # adapters compute in the compute dtype (see measure: autocast is not emulated)
            if p.requires_grad:
                p.data = p.data.to(dtype)
    else:
        t.requires_grad_(True)
    if train_cfg.gradient_checkpointing:
        t.enable_gradient_checkpointing()
    t.train()
    return t


def blocks(transformer) -> tuple[int, int]:
    """(parameters of the largest block, parameters outside every block list): FSDP2's units."""
    lists = [m for m in transformer.children() if isinstance(m, torch.nn.ModuleList)]
    sizes = [count_params(b) for ml in lists for b in ml]
    return (max(sizes) if sizes else count_params(transformer)), count_params(transformer) - sum(sizes)


def other_transformers(folder, dtype: torch.dtype) -> int:
    """Parameters of the pipeline's further transformers (``transformer_2``: Wan 2.2's second expert, frozen and
    resident for the rollout)."""
    return sum(count_params(build_meta(component_config(folder, name), dtype))
               for name in pipeline_components(folder) if name.startswith("transformer_")
               and component_config(folder, name) is not None)


def tokenizer_lengths(folder) -> dict[str, int]:
    """``{tokenizer folder: model_max_length}`` of a model directory (only those that state a usable length)."""
    out = {}
    for f in sorted(folder.glob("tokenizer*/tokenizer_config.json")):
        try:
            value = json.loads(f.read_text(encoding="utf-8")).get("model_max_length")
        except (OSError, ValueError):
            continue
        if isinstance(value, (int, float)) and 0 < value < 1e9:
            out[f.parent.name] = int(value)
    return out


def _true_cfg(family: str, transformer_config: dict, guidance: float) -> int:
    """Transformer passes per call: 2 for true classifier-free guidance (SD3, Qwen-Image: no guidance embedding,
    guidance > 1), else 1 (FLUX embeds guidance, or ignores it without an embedding)."""
    if family == "flux" or transformer_config.get("guidance_embeds"):
        return 1
    return 2 if guidance is not None and guidance > 1.0 else 1


def plan(cfg, gpus: int = 1, gpu_name: str = "H100-SXM", config_name: str = "") -> dict:
    """The resource plan of ``cfg`` on ``gpus`` GPUs called ``gpu_name`` (a JSON-ready dict; see the module)."""
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    device_info = find_gpu(gpu_name)
    m, t = cfg.model, cfg.train
    if m.path == "tiny-world" and m.family != "flux":
        raise PlanError(f"model.path=tiny-world is a FLUX-family model, but model.family={m.family}; set "
                        "model.family=flux")
    comp = components(m.path, cfg.reward.kind, cfg.reward.path)
    family = FAMILIES[m.family]
    multiple = family.resolution_multiple(comp.vae_config)
    if m.height % multiple or m.width % multiple:
        raise PlanError(f"model.height/width {m.height}x{m.width}: must be multiples of {multiple} for "
                        f"model.family={m.family}; use e.g. {max(multiple, m.height // multiple * multiple)}")
    factor = multiple // family.patch
    latent_hw = (m.height // factor, m.width // factor)
    weight_dtype = DTYPES[m.dtype]
    compute = torch.bfloat16 if t.mixed_precision == "bf16" else weight_dtype
    text = probes.text_tokens(m.family, m.max_sequence_length, tokenizer_lengths(comp.folder))
    fsdp = t.finetune == "full" and gpus > 1 and t.distributed in ("auto", "fsdp")

    transformer = setup_transformer(comp.transformer_config, t, m.family, compute, t.finetune)
    work = work_of(cfg, transformer, bool(comp.transformer_config.get("guidance_embeds")))
    n_trainable = count_params(transformer, trainable_only=True)
    n_base = count_params(transformer) - (n_trainable if t.finetune == "lora" else 0)
    n_lora = n_trainable if t.finetune == "lora" else count_params(
        setup_transformer(comp.transformer_config, t, m.family, compute, "lora"), trainable_only=True)
    largest_block, root = blocks(transformer)
    vae = build_meta(comp.vae_config, weight_dtype)
    vae.requires_grad_(False).eval()
    if t.vae_checkpointing and getattr(vae, "_supports_gradient_checkpointing", False):
        vae.enable_gradient_checkpointing()
    reward = None
    notes = []
    if comp.reward_folder is not None:
        reward = reward_models.build(cfg.reward.kind, comp.reward_folder, DTYPES[cfg.reward.dtype], cfg)
    else:
        notes.append(f"reward.kind={cfg.reward.kind}: no config known, the reward's cost is not counted")
    texts = {name: count_params(build_meta(c, weight_dtype, cls)) for name, (cls, c) in
             comp.text_encoder_configs.items()}

    # ------------------------------------------------------------------------------------------ measured graph
    class_name = comp.transformer_config.get("_class_name", "")
    probe = probes.TRANSFORMER_PROBES.get(class_name)
    if m.family in probes.FAMILY_PROBES:
        area = getattr(family.adapter_class(), "condition_area", 1024 * 1024)
        probe = partial(probes.FAMILY_PROBES[m.family], condition_area=area)
    cfg_ng = _true_cfg(m.family, comp.transformer_config, work.no_grad_guidance)
    cfg_g = _true_cfg(m.family, comp.transformer_config, work.grad_guidance)
    rows = work.graph_rows
    frames = probes.latent_frames(getattr(m, "frames", 1), comp.vae_config)
    shapes = probes.Shapes(rows, m.height, m.width, latent_hw, text, frames)
    device = torch.device("meta")
    if probe is None:
        raise PlanError(f"transformer class {class_name!r} has no planner probe; add one to "
                        "directalign.plan.probes.TRANSFORMER_PROBES")
    g = graph_cost(transformer, probe, shapes, compute, device, vae, t.vae_checkpointing, reward,
                   work.decode_in_graph)
    v_fwd, _ = forward_cost(vae, lambda: probes.decode(vae, latent_hw, 1, weight_dtype, device, frames=frames))
    video_frames = getattr(m, "frames", 1) if frames > 1 else 1  # decoded frames of one video (4k + 1)
    r_fwd = 0.0
    if reward is not None:  # a no-grad score of one image, times the frames of a video
        r_fwd, _ = forward_cost(reward, lambda: reward_models.score(
            reward, torch.zeros(1, 3, m.height, m.width, device=device)))
        r_fwd *= video_frames

    # ------------------------------------------------------------------------------------------ FLOPs per update
    per_row = {k: getattr(g, k) / rows for k in ("transformer_forward", "transformer_train", "vae_train",
                                                   "reward_train")}
    images_grad = work.nfe_grad / work.graph_calls if work.decode_in_graph else 0.0
    recompute = per_row["transformer_forward"] if work.method_checkpoint else 0.0
    flops = {
        "rollout": work.nfe_no_grad * cfg_ng * per_row["transformer_forward"],
        "grad_branches": work.nfe_grad * cfg_g * (per_row["transformer_train"] + recompute),
        "vae": images_grad * per_row["vae_train"] + work.decodes_no_grad * v_fwd,
        "reward": images_grad * per_row["reward_train"] + work.decodes_no_grad * r_fwd,
    }
    flops["total"] = sum(flops.values())

    # ------------------------------------------------------------------------------------------ memory per GPU
    n = gpus if fsdp else 1
    b_w, b_c = _bytes(weight_dtype), _bytes(compute)
    mem = {"transformer_weights": (n_base * b_w + n_lora * 4) if t.finetune == "lora" else n_base * 4 / n}
    mem["gradients"] = n_trainable * 4 / n
    mem["adamw_state"] = n_trainable * 8 / n
    mem["ema"] = n_trainable * 4 / n if t.ema_decay > 0 else 0.0
    mem["fsdp_gathered"] = ((root + 2 * largest_block) * b_c + largest_block * 4) if fsdp else 0.0
    cast_source = 4 if t.finetune == "full" else b_w  # dtype of the weights the big matmuls read
    casts = not fsdp and cast_source != b_c
    per_cast = (largest_block + root) if t.gradient_checkpointing else n_base
    mem["autocast_copies"] = per_cast * b_c if casts else 0.0
    reference = getattr(cfg, "grpo", None) is not None and cfg.grpo.kl_beta > 0 and t.finetune == "full"
    mem["reference_model"] = n_base * b_w if reference else 0.0
    mem["vae_weights"] = count_params(vae) * b_w
    mem["text_encoder_weights"] = sum(texts.values()) * b_w
    mem["other_transformer_weights"] = other_transformers(comp.folder, weight_dtype) * b_w  # Wan 2.2's other expert
    mem["reward_weights"] = count_params(reward) * _bytes(DTYPES[cfg.reward.dtype]) if reward is not None else 0.0
    chained = 0 if work.method_checkpoint else (work.graph_calls - 1) * g.retained_after_forward
    second_pass = g.retained_after_forward if cfg_g == 2 else 0
    mem["activations"] = max(g.peak_bytes + chained + second_pass, g.nograd_peak_bytes * cfg_ng)
    mem = {k: v / GIB for k, v in mem.items()}
    mem["reserve"] = RESERVE_GB
    mem["total"] = sum(mem.values())
    if frames > 1:
        notes.append(f"video: the transformer runs all {frames} latent frames; the VAE decodes the whole clip "
                     f"({frames} latent -> {video_frames} frames, causal 3-D) and the reward scores each of the "
                     f"{video_frames} frames (averaged per video), with gradient in the differentiable graph")
    if isinstance(reward, reward_models.HPSv3Scorer):
        from ..rewards.hpsv3 import smart_resize

        n_img = math.prod(smart_resize(m.height, m.width, 28, reward.pixels, reward.pixels)) // 28 ** 2
        lengths = [sum(reward.token_layout(x, n_img)) + n_img for x in reward.texts]
        notes.append(f"hpsv3: Qwen2-VL-7B vision tower once per image, language model over {len(lengths)} scored "
                     f"text(s) of {', '.join(map(str, lengths))} tokens ({n_img} image tokens; text tokens counted by "
                     "Qwen2's pre-tokenizer split, the median prompt of train.prompts)")
    elif isinstance(reward, reward_models.MPSScorer):
        notes.append(f"mps: CLIP ViT-H/14 image tokens once per image, the 4-layer fusion once per scored text "
                     f"({reward.n_texts})")
    if cfg_g == 2:
        notes.append("differentiable calls run true CFG (two passes): activations counted twice")
    if t.finetune == "lora":
        notes.append("peft casts a LoRA input to float32 under autocast: one extra compute-dtype copy per LoRA layer "
                     "call, not counted (one block's worth under gradient checkpointing)")

    seconds = flops["total"] / (device_info.bf16_tflops * 1e12)
    return {
        "config": config_name, "method": cfg.method, "family": m.family, "model": m.path,
        "resolution": [m.height, m.width], "latent": list(latent_hw), "text_tokens": text,
        "image_tokens": (latent_hw[0] // family.patch) * (latent_hw[1] // family.patch),
        "finetune": t.finetune, "gpus": gpus, "strategy": "fsdp2" if fsdp else ("replicate" if gpus > 1 else "single"),
        "dtype": m.dtype, "compute_dtype": str(compute).replace("torch.", ""),
        "gradient_checkpointing": t.gradient_checkpointing, "vae_checkpointing": t.vae_checkpointing,
        "batch_size": t.batch_size, "global_batch": t.batch_size * gpus,
        "params": {"transformer": n_base, "vae": count_params(vae), "text_encoders": texts,
                   "reward": count_params(reward) if reward is not None else 0},
        "trainable": {"lora": n_lora, "full": n_base, "this_run": n_trainable,
                      "lora_rank": t.lora_rank},
        "work": asdict(work) | {"cfg_passes_no_grad": cfg_ng, "cfg_passes_grad": cfg_g},
        "video": {"latent_frames": frames, "frames": video_frames},
        "reward": {"kind": cfg.reward.kind, "modelled": reward is not None,
                   "scored_texts": reward_models.scored_texts(cfg), "images_per_graph": rows * video_frames},
        "flops": flops,
        "measured": asdict(g),
        "memory_gib": mem,
        "gpu": {"name": device_info.name, "bf16_tflops": device_info.bf16_tflops,
                "memory_gib": device_info.memory_gb, "source": device_info.source,
                "time_per_update_s_lower_bound": seconds, "fits": mem["total"] <= device_info.memory_gb},
        "notes": notes,
    }
