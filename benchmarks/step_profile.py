"""Where the time of one SRPO step goes, NFE per optimizer step, and peak memory.

    python benchmarks/step_profile.py [--steps 5] [--out benchmarks/results/step_profile.json]

Configurations: the default tiny-world job (shipped weights, its own config) and FLUX-shaped random tiny models
with FLUX's 8x VAE and 16 latent channels at 64 and 128 px (the geometry of a real FLUX run, scaled down).
Per step it times: the no-grad rollout, the differentiable transformer forward(s), the VAE decode, the reward,
and the backward pass; the median over ``--steps`` steps after one warm-up step is reported.
Peak memory is the process's peak RSS on CPU (``torch.cuda.max_memory_allocated`` on GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from directalign.compat import quiet_loading
from directalign.adapters.loading import load_adapter
from directalign.config import build_config, packaged_config
from directalign.engine.context import StepContext
from directalign.engine.finetune import DTYPES, apply_finetune_mode
from directalign.methods.registry import METHODS
from directalign.rewards.registry import load_reward


class PhaseTimer:
    def __init__(self):
        self.totals: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds


def instrument(method, timer: PhaseTimer):
    """Wrap the adapter and reward calls so each phase's forward time is recorded."""
    adapter, reward = method.adapter, method.reward

    def wrap(obj, attr, phase_of):
        fn = getattr(obj, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            timer.add(phase_of(), time.perf_counter() - t0)
            return out

        setattr(obj, attr, timed)

    wrap(adapter, "velocity", lambda: "transformer_forward_grad" if torch.is_grad_enabled() else "rollout")
    wrap(adapter, "decode", lambda: "vae_decode")
    wrap(reward, "encode_images", lambda: "reward")
    wrap(reward, "score_texts", lambda: "reward")


def flux_shaped_world(root: Path, size: int) -> Path:
    """A random FLUX-geometry world: 8x VAE with 16 latent channels, FLUX-shaped transformer, random reward."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    from directalign.world import architecture as arch

    torch.manual_seed(0)
    comps = arch.new_generator_components()
    comps["vae"] = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 block_out_channels=(8, 16, 32, 32), layers_per_block=1, sample_size=size)
    comps["transformer"] = FluxTransformer2DModel(**dict(arch.TRANSFORMER_CONFIG, in_channels=64))
    FluxPipeline(**comps).save_pretrained(root / "generator")
    model, tok = arch.new_reward()
    model.save_pretrained(root / "reward")
    tok.save_pretrained(root / "reward")
    return root


def profile(name: str, overrides: list[str], steps: int, data: dict | None = None) -> dict:
    cfg = build_config(data or {}, overrides)
    device = torch.device("cpu")
    adapter = load_adapter(cfg.model, device, DTYPES[cfg.model.dtype])
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, device, spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)
    params = apply_finetune_mode(cfg.train, adapter)
    opt = torch.optim.AdamW(params, lr=cfg.train.learning_rate)
    timer = PhaseTimer()
    instrument(method, timer)
    rows = []
    prompts_pool = ["a red circle on a blue background", "a green cross on a white background",
                    "a yellow square on a purple background", "a blue triangle on a red background"]
    for step in range(steps + 1):
        timer.totals.clear()
        prompts = [prompts_pool[i % 4] for i in range(cfg.train.batch_size)]
        backward_time = [0.0]

        def backward(loss):
            t0 = time.perf_counter()
            loss.backward()
            backward_time[0] += time.perf_counter() - t0

        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        ctx = StepContext(step=step, prompts=prompts, seed=cfg.train.seed, batch_size=len(prompts))
        method.train_step(ctx, backward)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        total = time.perf_counter() - t0
        if step == 0:
            continue  # warm-up
        row = dict(timer.totals, backward=backward_time[0], total=total)
        row["other"] = total - sum(v for k, v in row.items() if k != "total")
        rows.append(row)
    keys = rows[0].keys()
    med = {k: statistics.median(r[k] for r in rows) for k in keys}
    nfe = method.nfe(cfg.train.batch_size)
    return {"config": name, "batch": cfg.train.batch_size, "resolution": cfg.model.height,
            "rollout_steps": cfg.srpo.rollout_steps, "finetune": cfg.train.finetune, **nfe,
            "seconds": med, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/step_profile.json"))
    args = p.parse_args(argv)
    quiet_loading()
    torch.set_num_threads(2)
    import yaml

    default = yaml.safe_load(packaged_config("tiny-srpo").read_text())
    results = [profile("tiny-srpo (default job)", [], args.steps, default)]
    import os

    for size in (64, 128):
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["DIRECTALIGN_WORLD_DIR"] = str(flux_shaped_world(Path(tmp), size))
            results.append(profile(f"flux-shaped {size}px", [f"model.height={size}", f"model.width={size}"],
                                   args.steps, default))
            del os.environ["DIRECTALIGN_WORLD_DIR"]
    phases = ["rollout", "transformer_forward_grad", "vae_decode", "reward", "backward", "other", "total"]
    print(f"{'config':26s} {'batch':>5s} " + " ".join(f"{ph[:12]:>12s}" for ph in phases)
          + f" {'NFE nograd':>10s} {'NFE grad':>8s} {'peakMB':>7s}")
    for r in results:
        print(f"{r['config']:26s} {r['batch']:5d} " + " ".join(f"{r['seconds'].get(ph, 0):12.3f}" for ph in phases)
              + f" {r['nfe_no_grad']:10d} {r['nfe_grad']:8d} {r['peak_rss_mb']:7.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.machine(), "python": sys.version.split()[0], "torch": torch.__version__,
            "threads": torch.get_num_threads(), "steps_measured": args.steps}
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
