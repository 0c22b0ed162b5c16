"""The plan as a table for people (``directalign plan``) and as JSON for machines (``--json``)."""

from __future__ import annotations

import json


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f}"


def _flops(f: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if abs(f) >= scale:
            return f"{f / scale:8.3f} {unit}"
    return f"{f:8.0f} FLOP"


MEMORY_ROWS = (
    ("transformer_weights", "transformer weights"),
    ("gradients", "gradients (float32)"),
    ("adamw_state", "AdamW moments (float32)"),
    ("ema", "EMA copy"),
    ("fsdp_gathered", "FSDP2 gathered blocks"),
    ("autocast_copies", "autocast weight copies"),
    ("reference_model", "GRPO reference model"),
    ("vae_weights", "VAE weights"),
    ("text_encoder_weights", "text encoder weights"),
    ("other_transformer_weights", "other transformer (frozen)"),
    ("reward_weights", "reward weights"),
    ("activations", "activations (peak)"),
    ("reserve", "CUDA context / workspaces"),
)


def table(p: dict) -> str:
    """A plain-text report of a plan from :func:`directalign.plan.estimate.plan`."""
    w, g, mem, fl = p["work"], p["gpu"], p["memory_gib"], p["flops"]
    h, wd = p["resolution"]
    out = [
        (f"directalign plan: {p['config'] or '(config)'}  method {p['method']}, model.family {p['family']}, "
        f"{p['model']}"),
        (f"  {h}x{wd} px: {p['image_tokens']} image + {p['text_tokens']} text tokens; batch {p['batch_size']} per GPU "
        f"(global {p['global_batch']}); weights {p['dtype']}, compute {p['compute_dtype']}; gradient checkpointing "
        f"{'on' if p['gradient_checkpointing'] else 'off'}, VAE checkpointing {'on' if p['vae_checkpointing'] else 'off'}"),
        f"  fine-tuning {p['finetune']}" + (f" (rank {p['trainable']['lora_rank']})" if p["finetune"] == "lora" else "")
        + f" on {p['gpus']}x {g['name']} ({p['strategy']})",
        "",
        f"{'parameters':34s}{'count':>12s}",
        (f"  {'transformer':32s}{_count(p['params']['transformer']):>12s}   trainable: LoRA "
        f"{_count(p['trainable']['lora'])}, full {_count(p['trainable']['full'])}"),
        f"  {'VAE':32s}{_count(p['params']['vae']):>12s}",
    ]
    for name, n in p["params"]["text_encoders"].items():
        out.append(f"  {name:32s}{_count(n):>12s}")
    out.append(f"  {'reward':32s}{_count(p['params']['reward']):>12s}")
    cfg_ng = f" x {w['cfg_passes_no_grad']} (true CFG)" if w["cfg_passes_no_grad"] > 1 else ""
    cfg_g = f" x {w['cfg_passes_grad']} (true CFG)" if w["cfg_passes_grad"] > 1 else ""
    v, r = p["video"], p["reward"]
    video = (f"   whole clip: {v['latent_frames']} latent -> {v['frames']} frames per video" if v["frames"] > 1
             else "")
    texts = f" x {r['scored_texts']} text(s)" if r["kind"] in ("hpsv3", "mps") else ""  # CLIP: text side cached
    scored = (f"   {r['kind']}: {r['images_per_graph']} image(s) per graph{texts}" if r["modelled"]
              else f"   {r['kind']}: not counted (no config)")
    out += [
        "",
        f"{'FLOPs per update, per GPU':34s}{'':>14s}",
        f"  {'rollout (no grad)':32s}{_flops(fl['rollout']):>14s}   {w['nfe_no_grad']:g} transformer calls{cfg_ng}",
        f"  {'gradient branches':32s}{_flops(fl['grad_branches']):>14s}   {w['nfe_grad']:g} calls{cfg_g}, forward + "
        "backward" + (" + recomputation" if p["gradient_checkpointing"] or w["method_checkpoint"] else ""),
        f"  {'VAE decode (+ backward)':32s}{_flops(fl['vae']):>14s}{video}",
        f"  {'reward (+ backward)':32s}{_flops(fl['reward']):>14s}{scored}",
        f"  {'total':32s}{_flops(fl['total']):>14s}   ({w['note']})",
        "",
        f"{'memory per GPU':34s}{'GiB':>12s}",
    ]
    for key, label in MEMORY_ROWS:
        if mem.get(key):
            out.append(f"  {label:32s}{mem[key]:12.2f}")
    verdict = "fits" if g["fits"] else "does NOT fit"
    out += [
        f"  {'total':32s}{mem['total']:12.2f}   of {g['memory_gib']:g} GiB on {g['name']}: {verdict}",
        "",
        (f"time per update >= {g['time_per_update_s_lower_bound']:.3g} s on {g['name']} at its peak "
        f"{g['bf16_tflops']:g} TFLOPS dense bf16 ({g['source']}); real runs reach 30-60 % of peak"),
    ]
    out += [f"note: {n}" for n in p["notes"]]
    return "\n".join(out)


def to_json(p: dict) -> str:
    return json.dumps(p, indent=2, sort_keys=False)
