"""Where the time of one SRPO step goes, NFE per optimizer step, and peak memory per phase.

    python benchmarks/step_profile.py [--steps 5] [--out benchmarks/results/step_profile.json]
    python benchmarks/step_profile.py --memory [--set model.height=64 ...]   # memory per phase only

Configurations: the default tiny-world job (shipped weights, its own config) and FLUX-shaped random tiny models
with FLUX's 8x VAE and 16 latent channels at 64 and 128 px (the geometry of a real FLUX run, scaled down).
Per step it times: the no-grad rollout, the differentiable transformer forward(s), the VAE decode, the reward,
and the backward pass; the median over ``--steps`` steps after one warm-up step is reported.
Peak memory is the process's peak RSS on CPU (``torch.cuda.max_memory_allocated`` on GPU).

Memory per phase (``--memory``): the live bytes of the tensor storages the step creates, tracked by the planner's
:class:`directalign.plan.measure.LiveBytes` dispatch mode (no allocator rounding; weights made before the step are
not counted, their gradients and the optimizer state are), split into the phases rollout (prompt embeddings and the
no-grad rollout), ``<branch>_forward`` / ``<branch>_backward`` for each Direct-Align branch, and ``optimizer``
(clip + AdamW step); per phase the peak and the level at its end, both relative to the level before the step, and
the process's peak RSS over the phase (``/proc/self/clear_refs`` resets the high-water mark on Linux).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from directalign.adapters.loading import load_adapter
from directalign.compat import quiet_loading
from directalign.config import build_config, packaged_config
from directalign.engine.context import StepContext
from directalign.engine.distributed import DistInfo
from directalign.engine.finetune import DTYPES, FineTuning, apply_finetune_mode
from directalign.engine.loop import clip_and_measure
from directalign.methods.registry import METHODS
from directalign.plan.measure import LiveBytes
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


def _proc_status_mb(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` of this process in MB (Linux), 0.0 where /proc is not available."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _reset_peak_rss() -> None:
    """Reset the process's RSS high-water mark (``VmHWM``; Linux >= 4.0); a no-op where that is refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class PhaseMemory(LiveBytes):
    """The planner's live-bytes tracker, split into named phases of a training step.

    ``begin_step()`` takes the level before the step (the optimizer state and caches of earlier steps) as the base;
    while the step runs, each tensor-creating operator raises the peak of the current phase (``other`` outside the
    named ones, so the step's total peak is exactly the max over its phases). Per phase: ``peak`` and ``end``
    (bytes above the base; a named phase's peak includes the level it started at, so ``peak >= end``) and
    ``rss_peak_mb``. ``other`` counts only its own allocations (the level it inherits is the previous phase's end).
    """

    def __init__(self):
        super().__init__()
        self.base = 0
        self.name = "other"
        self.phases: dict[str, dict] = {}

    def begin_step(self) -> None:
        gc.collect()
        self.base = self.peak = self.current
        self.phases = {}
        self._enter("other")

    def _enter(self, name: str) -> None:
        self.name = name
        row = self.phases.setdefault(name, {"peak": 0, "rss_peak_mb": 0.0} if name == "other" else
                                     {"peak": 0, "end": 0, "rss_peak_mb": 0.0})
        if name != "other":  # the gaps count only what they allocate; the level they pass on is a phase's end
            row["peak"] = max(row["peak"], self.current - self.base)
        _reset_peak_rss()

    def _leave(self) -> None:
        row = self.phases[self.name]
        if self.name != "other":
            row["end"] = self.current - self.base
        row["rss_peak_mb"] = max(row["rss_peak_mb"], _proc_status_mb("VmHWM"))

    def switch(self, name: str) -> None:
        """End the current phase and start ``name`` (for callers that see only where phases begin)."""
        self._leave()
        self._enter(name)

    @contextlib.contextmanager
    def phase(self, name: str):
        self._leave()
        self._enter(name)
        try:
            yield
        finally:
            self._leave()
            self._enter("other")

    def end_step(self) -> dict:
        """``{phase: {...}, "total": {"peak", "end"}}`` of the step (bytes above the level before it)."""
        self._leave()
        self.name = ""  # outside a step: nothing is recorded
        total = {"peak": max(r["peak"] for r in self.phases.values()), "end": self.current - self.base,
                 "rss_peak_mb": max(r["rss_peak_mb"] for r in self.phases.values())}
        return {**{k: dict(v) for k, v in self.phases.items()}, "total": total}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        row = self.phases.get(self.name)
        if row is not None:
            row["peak"] = max(row["peak"], self.current - self.base)
        return out


def phase_instrument(method, tracker: PhaseMemory):
    """Run ``method``'s prompt encoding, rollout and each branch's forward inside the tracker's phases (SRPO /
    Direct-Align); returns
    the ``backward`` callable for ``train_step`` that runs the matching ``<branch>_backward`` phase."""
    clean, branch, encode = method.clean_latents, method.branch_loss, method.adapter.encode_prompts
    current = ["branch"]

    def encode_prompts(*args, **kwargs):
        with tracker.phase("prompts"):
            return encode(*args, **kwargs)

    def clean_latents(*args, **kwargs):
        with tracker.phase("rollout"):
            return clean(*args, **kwargs)

    def branch_loss(name, *args, **kwargs):
        current[0] = name
        with tracker.phase(f"{name}_forward"):
            return branch(name, *args, **kwargs)

    def backward(loss):
        with tracker.phase(f"{current[0]}_backward"):
            loss.backward()

    method.clean_latents, method.branch_loss, method.adapter.encode_prompts = clean_latents, branch_loss, encode_prompts
    return backward


def memory_profile(name: str, cfg, steps: int = 2) -> dict:
    """Live tensor bytes per phase of SRPO steps of ``cfg`` (the last of ``steps``; the first warms the caches and
    creates the optimizer state), and the bytes still alive after ``train_step`` returns beyond the gradients."""
    device = torch.device("cpu")
    adapter = load_adapter(cfg.model, device, DTYPES[cfg.model.dtype])
    spec = METHODS[cfg.method]
    reward = load_reward(cfg.reward, device, spec.held_out_form(cfg)[0])
    method = spec.build(cfg, adapter, reward)
    ft = FineTuning.setup(cfg.train, adapter, DistInfo())  # as training sets it up: masters, autocast, AdamW, EMA
    params, opt = ft.params, ft.optimizer
    tracker = PhaseMemory()
    backward = phase_instrument(method, tracker)
    prompts_pool = ["a red circle on a blue background", "a green cross on a white background"]
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    rss_before = _proc_status_mb("VmRSS")
    per_step = []
    with tracker:
        for step in range(steps):
            opt.zero_grad(set_to_none=True)
            tracker.begin_step()
            prompts = [prompts_pool[i % 2] for i in range(cfg.train.batch_size)]
            ctx = StepContext(step=step, prompts=prompts, seed=cfg.train.seed, batch_size=len(prompts))
            method.train_step(ctx, backward)
            gc.collect()
            kept = tracker.current - tracker.base - grad_bytes
            with tracker.phase("optimizer"):  # as engine.loop.StepLoop.one_step on one process
                clip_and_measure(params, cfg.train.grad_clip)
                opt.step()
                ft.update_ema()
                opt.zero_grad(set_to_none=True)  # the loop frees the gradients with their step
                ft.scheduler.step()
            per_step.append({"phases": tracker.end_step(), "kept_after_step_bytes": kept,
                             "live_peak_bytes": tracker.peak - tracker.base,  # LiveBytes' own peak of the step
                             "rss_after_mb": _proc_status_mb("VmRSS")})
        opt.zero_grad(set_to_none=True)
        gc.collect()
    return {"config": name, "batch": cfg.train.batch_size, "resolution": cfg.model.height,
            "text_tokens": adapter.max_sequence_length, "rollout_steps": cfg.srpo.rollout_steps,
            "finetune": cfg.train.finetune, "dtype": cfg.model.dtype, "trainable_bytes": grad_bytes,
            "persistent_bytes": tracker.base, "rss_before_mb": rss_before, "steps": per_step,
            **per_step[-1]}


def flux_shaped_world(root: Path, size: int) -> Path:
    """A random FLUX-geometry world: 8x VAE with 16 latent channels, FLUX-shaped transformer, random reward."""
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel

    from directalign.world import architecture as arch

    torch.manual_seed(0)
    comps = arch.new_generator_components()
    comps["vae"] = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
                                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                                 block_out_channels=(8, 16, 32, 32), layers_per_block=1, sample_size=size,
                                 scaling_factor=0.3611, shift_factor=0.1159)  # FLUX.1's VAE constants
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

        def backward(loss, backward_time=backward_time):
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


# The issue-17 comparison's work: one update = 25 no-grad forwards + both branches, 64 px, 512 text tokens.
MEMORY_SETTINGS = ["method=srpo", "model.height=64", "model.width=64", "model.max_sequence_length=512",
                   "train.batch_size=1", "srpo.rollout_steps=25"]
MEMORY_PHASES = ["prompts", "rollout", "denoise_forward", "denoise_backward", "inversion_forward",
                 "inversion_backward", "optimizer", "other", "total"]


def memory_table(results: list[dict]) -> str:
    """Peak / end MiB above the pre-step level per phase, and peak RSS MB, one block per configuration."""
    mib = 2 ** 20
    lines = [f"{'config':34s} " + " ".join(f"{ph[:18]:>18s}" for ph in MEMORY_PHASES)]
    for r in results:
        ph = r["phases"]
        cells = [f"{ph[k]['peak'] / mib:8.2f}/{ph[k].get('end', 0) / mib:<8.2f}" if k in ph else f"{'-':>17s}"
                 for k in MEMORY_PHASES]
        lines.append(f"{r['config']:34s} " + " ".join(f"{c:>18s}" for c in cells))
        lines.append(f"{'  peak RSS MB':34s} " + " ".join(
            f"{ph[k]['rss_peak_mb']:18.1f}" if k in ph else f"{'-':>18s}" for k in MEMORY_PHASES))
        lines.append(f"  kept after train_step beyond the gradients: {r['kept_after_step_bytes']} B; persistent "
                     f"(optimizer state + caches) {r['persistent_bytes'] / mib:.2f} MiB; gradients "
                     f"{r['trainable_bytes'] / mib:.2f} MiB; RSS {r['rss_before_mb']:.0f} -> {r['rss_after_mb']:.0f} MB")
    return "\n".join(lines)


def memory_main(args) -> None:
    results = []
    for finetune in ("full", "lora"):
        cfg = build_config({}, MEMORY_SETTINGS + [f"train.finetune={finetune}"] + args.set)
        results.append(memory_profile(f"srpo 64px 512tok {finetune}", cfg, steps=args.steps))
    print("live tensor MiB above the pre-step level per phase: peak/end (warm step; 'other' = outside the phases)")
    print(memory_table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": MEMORY_SETTINGS + args.set, "results": results}, indent=1))
    print(f"wrote {args.out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--memory", action="store_true", help="memory per phase only (live tensor bytes and RSS)")
    p.add_argument("--set", action="append", default=[], help="config override for --memory (key=value)")
    args = p.parse_args(argv)
    quiet_loading()
    torch.set_num_threads(2)
    if args.memory:
        args.out = args.out or Path("benchmarks/results/step_memory.json")
        args.steps = max(2, min(args.steps, 3))  # the first step warms caches and creates the optimizer state
        return memory_main(args)
    args.out = args.out or Path("benchmarks/results/step_profile.json")
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
