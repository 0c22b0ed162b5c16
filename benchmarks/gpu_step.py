"""Seconds per SRPO update, peak memory and model-FLOPs utilisation of a FLUX-shaped transformer, against the planner.

    python benchmarks/gpu_step.py --gpu H100-SXM             # 4 double + 8 single blocks at FLUX.1-dev's width, 720 px
    python benchmarks/gpu_step.py --double-blocks 2 --single-blocks 4 --gpu A100-80GB
    python benchmarks/gpu_step.py --tiny                     # CPU smoke run: a small width at 64 px

The transformer is the real diffusers ``FluxTransformer2DModel`` built from FLUX.1-dev's own ``config.json`` (shipped
in ``assets/plan-configs/flux1-dev/transformer``) with ``num_layers`` / ``num_single_layers`` overridden, random
weights (nothing is downloaded), set up as the engine does it (``engine/finetune.apply_finetune_mode``: LoRA or full
fine-tuning with gradient checkpointing; ``engine/precision``: float32 master weights of the trainable parameters and
bf16 autocast) with the settings of the shipped ``flux-dev-srpo-hpsv2`` config.

What one timed update runs, and why only the transformer: the planner (``directalign.plan``) splits an update's FLOPs
into the rollout and the gradient branches (the transformer: the part that scales with depth and width) and the VAE
and reward (fixed modules it counts from their own configs). Stand-in tiny VAE / text encoders / reward would add time
that is neither FLUX's nor the planner's, so the update is the transformer's share of ``methods/srpo.SRPO.train_step``
through the same flow math: the no-grad Euler rollout (``flow.euler_ode``, ``srpo.rollout_steps`` calls at the rollout
guidance), one window draw (``flow.draw_window``) and the denoise and inversion branches (``flow.direct_align_x0`` at
the train guidance), each with its own backward (the decode + reward loss replaced by the mean square of x0_hat), then
the AdamW step. Its FLOPs come from the planner: ``plan.measure.graph_cost`` on the meta device (FlopCounterMode) of the
same model, times ``plan.work.work_of``'s call counts. MFU = FLOPs / (seconds x the --gpu's peak dense bf16 throughput,
``plan/gpus.py``); on a CPU that ratio only checks the bookkeeping. Peak memory: ``torch.cuda.max_memory_allocated``
above the level before the model is built; on a CPU the peak resident set (RSS, sampled every 2 ms) above that level.

Full depth (19 double + 38 single blocks): every block of a kind does the same work, so the planner's FLOPs per update
are ``rest + D x double + S x single``, read off meta counts at (1, 1), (2, 1) and (1, 2) blocks. The measured
seconds are split over the rest and the blocks in proportion to those FLOPs (time per block), and the full-depth time
is ``rest + 19 x double + 38 x single`` (it assumes each block keeps the measured MFU), set beside the planner's lower
bound at full depth: its FLOPs at 19 + 38 blocks (from the same linear form; the tests check the form against a direct
meta count) over the GPU's peak. ``directalign plan --config flux-dev-srpo-hpsv2`` adds the VAE, reward and memory.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from directalign import flow
from directalign.adapters.flux import FluxAdapter
from directalign.config import load_config, packaged_config
from directalign.engine import precision
from directalign.engine.finetune import apply_finetune_mode
from directalign.plan import probes, sources
from directalign.plan.estimate import setup_transformer
from directalign.plan.gpus import GPUS
from directalign.plan.gpus import gpu as find_gpu
from directalign.plan.measure import graph_cost
from directalign.plan.work import work_of

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "flux-dev-srpo-hpsv2"
FULL_DEPTH = (19, 38)  # FLUX.1-dev's num_layers, num_single_layers
TINY_WIDTH = {"num_attention_heads": 2, "attention_head_dim": 16, "axes_dims_rope": [4, 6, 6],
              "joint_attention_dim": 32, "pooled_projection_dim": 16}
VAE_FACTOR = 8  # FLUX's VAE: 8x spatial; the transformer packs 2x2 latent patches into one token


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--double-blocks", type=int, default=4, help="num_layers (FLUX.1-dev: 19)")
    p.add_argument("--single-blocks", type=int, default=8, help="num_single_layers (FLUX.1-dev: 38)")
    p.add_argument("--size", type=int, default=None, help="image height = width in px (default 720; --tiny: 64)")
    p.add_argument("--text-tokens", type=int, default=None, help="T5 tokens (default: the config's 512; --tiny: 64)")
    p.add_argument("--rollout-steps", type=int, default=None, help="no-grad rollout calls (default: the config's)")
    p.add_argument("--finetune", nargs="+", choices=("lora", "full"), default=["lora", "full"])
    p.add_argument("--lora-rank", type=int, default=None, help="default: the config's train.lora_rank")
    p.add_argument("--gpu", default=None, help=f"peak-throughput row for MFU: {', '.join(GPUS)} (default: guessed "
                   "from the CUDA device's name, else H100-SXM)")
    p.add_argument("--updates", type=int, default=3, help="timed updates (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed updates first (kernel selection, optimizer state)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--tiny", action="store_true", help="a small width (2 heads x 16) at 64 px: a CPU smoke run")
    p.add_argument("--out", type=Path, default=None, help="JSON (default benchmarks/results/gpu_step/<device>.json)")
    args = p.parse_args(argv)
    args.size = args.size or (64 if args.tiny else 720)
    if args.size % (2 * VAE_FACTOR):
        p.error(f"--size {args.size}: must be a multiple of {2 * VAE_FACTOR} (8x VAE, 2x2 token patches)")
    if min(args.double_blocks, args.single_blocks) < 1 or args.updates < 1 or args.warmup < 0:
        p.error("--double-blocks, --single-blocks and --updates must be >= 1, --warmup >= 0")
    return args


def transformer_config(tiny: bool, double: int, single: int) -> dict:
    """FLUX.1-dev's transformer config.json with the depth overridden (and, for --tiny, a small width)."""
    config = sources.component_config(sources.model_dir("black-forest-labs/FLUX.1-dev"), "transformer")
    return dict(config, **(TINY_WIDTH if tiny else {}), num_layers=double, num_single_layers=single)


def srpo_config(finetune: str, args):
    overrides = [f"train.finetune={finetune}", "train.vae_checkpointing=false", "train.gradient_checkpointing=true",
                 "train.mixed_precision=bf16"]
    if args.rollout_steps is not None:
        overrides.append(f"srpo.rollout_steps={args.rollout_steps}")
    rank = args.lora_rank or (4 if args.tiny else None)  # --tiny: rank 16 would be half of a 32-wide layer
    if rank is not None:
        overrides += [f"train.lora_rank={rank}", f"train.lora_alpha={rank}"]
    if args.text_tokens is not None or args.tiny:
        overrides.append(f"model.max_sequence_length={args.text_tokens or 64}")
    return load_config(packaged_config(CONFIG), overrides)


# ------------------------------------------------------------------------------------------------ the planner
def planner_costs(config: dict, cfg, shapes: probes.Shapes, double: int, single: int) -> dict:
    """FLOPs per update from the planner (meta device) at the measured depth, per block and at full depth."""
    work = work_of(cfg)
    probe = probes.TRANSFORMER_PROBES[config["_class_name"]]

    cache = {}

    def at(d: int, s: int):
        if (d, s) in cache:
            return cache[d, s]
        t = setup_transformer(dict(config, num_layers=d, num_single_layers=s), cfg.train, "flux", torch.bfloat16,
                              cfg.train.finetune)
        g = graph_cost(t, probe, shapes, torch.bfloat16, torch.device("meta"), decode_in_graph=False)
        flops = (work.nfe_no_grad * g.transformer_forward + work.nfe_grad * g.transformer_train) / g.rows
        cache[d, s] = flops, g
        return flops, g

    measured, g = at(double, single)
    base = at(1, 1)[0]
    per_double, per_single = at(2, 1)[0] - base, at(1, 2)[0] - base
    rest = base - per_double - per_single
    d, s = FULL_DEPTH
    return {"work": {"nfe_no_grad": work.nfe_no_grad, "nfe_grad": work.nfe_grad},
            "forward_flops": g.transformer_forward, "train_flops": g.transformer_train, "update_flops": measured,
            "rest_flops": rest, "double_block_flops": per_double, "single_block_flops": per_single,
            "full_depth_update_flops": rest + d * per_double + s * per_single,
            "activation_peak_bytes": max(g.peak_bytes, g.nograd_peak_bytes)}


# ------------------------------------------------------------------------------------------------ the real run
class PeakRSS:
    """Peak resident set of this process above its level at entry, sampled every 2 ms (the CPU's stand-in for
    ``torch.cuda.max_memory_allocated``)."""

    def __enter__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        try:
            return int(Path("/proc/self/statm").read_text().split()[1]) * self.page
        except OSError:  # not Linux: the process's lifetime peak (ru_maxrss, KiB)
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _sample(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


def build(config: dict, cfg, device: torch.device):
    """The transformer with random weights on ``device``, fine-tuning set up as the engine does; (module, params)."""
    from diffusers import FluxTransformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # model.dtype bfloat16: no float32 copy of the whole model on the way
    try:
        with torch.device(device):
            t = FluxTransformer2DModel.from_config(config)
    finally:
        torch.set_default_dtype(default)
    stub = SimpleNamespace(transformer=t, lora_target_modules=FluxAdapter.lora_target_modules, vae=None)
    params = apply_finetune_mode(cfg.train, stub)
    precision.float32_master_weights(t)
    precision.autocast_forward(t, torch.bfloat16)
    return t, params


def make_update(t, opt, cfg, shapes: probes.Shapes, device: torch.device):
    """One SRPO update's transformer work (see the module docstring) as a function of no arguments."""
    c, s = t.config, cfg.srpo
    h, w = shapes.latent_hw
    tokens, dtype = (h // 2) * (w // 2), torch.bfloat16
    gen = torch.Generator().manual_seed(cfg.train.seed)
    text = torch.randn(1, shapes.text_tokens, c.joint_attention_dim, generator=gen).to(device, dtype)
    pooled = torch.randn(1, c.pooled_projection_dim, generator=gen).to(device, dtype)
    txt_ids = torch.zeros(shapes.text_tokens, 3, device=device, dtype=dtype)
    img_ids = torch.zeros(h // 2, w // 2, 3, device=device, dtype=dtype)  # FluxPipeline._prepare_latent_image_ids
    img_ids[..., 1] += torch.arange(h // 2, device=device, dtype=dtype)[:, None]
    img_ids[..., 2] += torch.arange(w // 2, device=device, dtype=dtype)[None, :]
    img_ids = img_ids.reshape(tokens, 3)
    sigmas = flow.sigma_schedule(s.rollout_steps, cfg.sampling.shift).to(device)
    grid = flow.training_sigma_grid(s.schedule_steps, cfg.sampling.shift, s.window[0], s.window[1], s.grid_points)

    def velocity(guidance: float):
        g = torch.full((1,), guidance, device=device) if c.guidance_embeds else None

        def v(x, sigma):
            sigma = flow.quantize_sigma(torch.as_tensor(sigma, device=device), s.quantize_timestep)
            return t(hidden_states=x, timestep=sigma.to(x.dtype).expand(1), guidance=g, pooled_projections=pooled,
                     encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]

        return v

    def update():
        noise = torch.randn(1, tokens, c.in_channels, generator=gen).to(device, dtype)
        with torch.no_grad():
            x0 = flow.euler_ode(noise, sigmas, velocity(s.rollout_guidance))
        draw = flow.draw_window(grid, s.groundtruth_ratio, gen, s.window_margin)
        branches = [(draw.denoise_query, draw.denoise_target)] * s.denoise_branch
        branches += [(draw.inversion_query, draw.inversion_target)] * s.inversion_branch
        for sq, st in branches:
            x0_hat = flow.direct_align_x0(x0, noise, sq, st, velocity(s.train_guidance))
            (x0_hat.float().square().mean() / len(branches)).backward()  # stands in for decode + reward loss
        opt.step()
        opt.zero_grad(set_to_none=True)

    return update


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(config: dict, cfg, shapes: probes.Shapes, device: torch.device, updates: int, warmup: int) -> dict:
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
    with PeakRSS() as rss:
        t, params = build(config, cfg, device)
        tr = cfg.train
        opt = torch.optim.AdamW(params, lr=tr.learning_rate, betas=tuple(tr.adam_betas), eps=tr.adam_eps,
                                weight_decay=tr.weight_decay)
        update = make_update(t, opt, cfg, shapes, device)
        for _ in range(warmup):
            update()
        times = []
        for _ in range(updates):
            _sync(device)
            t0 = time.perf_counter()
            update()
            _sync(device)
            times.append(time.perf_counter() - t0)
    state = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    out = {"seconds_per_update": statistics.median(times), "seconds_all": times,
           "trainable_params": sum(p.numel() for p in params),
           "total_params": sum(p.numel() for p in t.parameters()),
           "weight_bytes": sum(p.numel() * p.element_size() for p in t.parameters()),
           "optimizer_state_bytes": sum(v.numel() * v.element_size() for v in state),
           "peak_memory_bytes": (torch.cuda.max_memory_allocated(device) - start) if cuda else rss.delta,
           "peak_memory_kind": "torch.cuda.max_memory_allocated above the start" if cuda else
           "peak RSS above the start (CPU; includes allocator caching and framework buffers)"}
    del t, opt, params, update, state
    gc.collect()
    return out


# ------------------------------------------------------------------------------------------------ the report
def machine(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__, "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity") else os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        prop = torch.cuda.get_device_properties(device)
        info |= {"name": prop.name, "memory_gib": prop.total_memory / 2 ** 30, "cuda": torch.version.cuda}
    else:
        info["name"] = platform.processor() or platform.machine() or "cpu"
    return info


def guess_gpu(info: dict) -> str:
    """The table row matching the CUDA device's name (an A100 by its memory), else H100-SXM."""
    name = info.get("name", "").upper().replace(" ", "")
    for key, row in (("H100", "H100-SXM"), ("H20", "H20"), ("L40S", "L40S"), ("4090", "RTX-4090")):
        if key in name:
            return row
    if "A100" in name:
        return "A100-80GB" if info.get("memory_gib", 80) > 60 else "A100-40GB"
    return "H100-SXM"


def result_row(m: dict, p: dict, tflops: float, double: int, single: int) -> dict:
    """Measured numbers beside the planner's, MFU and the full-depth extrapolation."""
    s, peak = m["seconds_per_update"], tflops * 1e12
    share = s / p["update_flops"]  # seconds per planned FLOP at the measured MFU
    per_block = {"rest_s": share * p["rest_flops"], "double_s": share * p["double_block_flops"],
                 "single_s": share * p["single_block_flops"]}
    d, sg = FULL_DEPTH
    extrapolated = per_block["rest_s"] + d * per_block["double_s"] + sg * per_block["single_s"]
    lower = p["full_depth_update_flops"] / peak
    return {**m, "planner": p, "mfu": p["update_flops"] / (s * peak),
            "per_block": per_block,
            "full_depth": {"double_blocks": d, "single_blocks": sg, "extrapolated_s": extrapolated,
                           "planner_flops": p["full_depth_update_flops"], "planner_lower_bound_s": lower,
                           "extrapolated_over_lower_bound": extrapolated / lower}}


def table(report: dict) -> str:
    gi = 2 ** 30
    m = report["machine"]
    head = (f"device {m['name']} ({m['device']}), {m['usable_cores']} core(s), {m['torch_threads']} torch "
            f"thread(s); MFU against {report['gpu']['name']} ({report['gpu']['bf16_tflops']:g} TFLOPS bf16)")
    shape = (f"FLUX-shaped transformer: {report['double_blocks']} double + {report['single_blocks']} single blocks, "
             f"width {report['width']}, {report['size']} px ({report['image_tokens']} image + "
             f"{report['text_tokens']} text tokens), bf16 autocast, gradient checkpointing; one update = "
             f"{report['nfe_no_grad']:g} no-grad forwards + {report['nfe_grad']:g} forward+backward + AdamW")
    cols = (f"{'mode':5} {'trainable':>11} {'s/update':>9} {'peak GiB':>9} {'TFLOP/upd':>10} {'MFU':>7} "
            f"{'full s (extrap)':>15} {'full s (bound)':>14} {'ratio':>6}")
    lines = [head, shape, "", cols]
    for mode, r in report["results"].items():
        f = r["full_depth"]
        mfu = f"{100 * r['mfu']:.3g}%"
        lines.append(f"{mode:5} {r['trainable_params']:>11,} {r['seconds_per_update']:>9.4g} "
                     f"{r['peak_memory_bytes'] / gi:>9.4g} {r['planner']['update_flops'] / 1e12:>10.4g} "
                     f"{mfu:>7} {f['extrapolated_s']:>15.4g} {f['planner_lower_bound_s']:>14.4g} "
                     f"{f['extrapolated_over_lower_bound']:>6.3g}")
    if report["machine"]["device"].startswith("cpu"):
        lines.append("(CPU: peak memory is the RSS increase; MFU against a GPU's peak only checks the bookkeeping)")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    info = machine(device)
    row = find_gpu(args.gpu or guess_gpu(info))
    config = transformer_config(args.tiny, args.double_blocks, args.single_blocks)
    latent = (args.size // VAE_FACTOR,) * 2
    results, cfg = {}, None
    for mode in args.finetune:
        cfg = srpo_config(mode, args)
        shapes = probes.Shapes(1, args.size, args.size, latent, cfg.model.max_sequence_length)
        planned = planner_costs(config, cfg, shapes, args.double_blocks, args.single_blocks)
        measured = measure(config, cfg, shapes, device, args.updates, args.warmup)
        results[mode] = result_row(measured, planned, row.bf16_tflops, args.double_blocks, args.single_blocks)
    work = next(iter(results.values()))["planner"]["work"]
    report = {"benchmark": "gpu_step", "config": CONFIG, "tiny": args.tiny, "double_blocks": args.double_blocks,
              "single_blocks": args.single_blocks, "size": args.size, "width": config["num_attention_heads"] *
              config["attention_head_dim"], "image_tokens": (latent[0] // 2) * (latent[1] // 2),
              "text_tokens": cfg.model.max_sequence_length, "rollout_steps": cfg.srpo.rollout_steps,
              "nfe_no_grad": work["nfe_no_grad"], "nfe_grad": work["nfe_grad"], "lora_rank": cfg.train.lora_rank,
              "updates": args.updates, "warmup": args.warmup, "transformer_config": config,
              "gpu": {"name": row.name, "bf16_tflops": row.bf16_tflops, "source": row.source},
              "machine": info, "results": results}
    slug = "".join(ch if ch.isalnum() else "-" for ch in info["name"]).strip("-") or device.type
    out = args.out or ROOT / "benchmarks" / "results" / "gpu_step" / f"{slug}{'-tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(report))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
