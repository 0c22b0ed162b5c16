"""Time to quality of SRPO on the tiny world: the official settings against faster ones, side by side in one run.

    python benchmarks/time_to_quality.py                     # every arm, 1 seed (about 11 minutes here)
    python benchmarks/time_to_quality.py --budget 120 --arms official,b1-r16-reuse4 --seeds 2
    python benchmarks/time_to_quality.py --render benchmarks/results/time_to_quality   # redraw table and plots

An *arm* is SRPO with a set of overrides of ``configs/tiny-srpo.yaml``:

* ``official``: the official code's step (Tencent-Hunyuan/SRPO, ``train.py``): batch 1 (one prompt per GPU; one
  process here), a 25-step rollout, both branches, one Direct-Align draw per rollout, a new rollout every step, and
  the tiny world's learning rate (3e-5, its counterpart of the official 5e-6 on FLUX);
* the levers, alone and combined: batching (``train.batch_size``), fewer rollout steps (``srpo.rollout_steps``;
  the tiny world is distilled for 16), rollout reuse (``srpo.rollout_reuse``: one rollout feeds R steps at fresh
  window draws). The prompt-embedding cache is always on (every adapter caches per prompt); ``torch.compile`` is
  not an arm: on this CPU it costs 80-105 s cold and is barely faster at 64 px (measured before), more than the
  whole time to quality here.

Every arm trains from the same base with the same seed, learning rate, LoRA, window and reward, in sessions that end
at evaluation points every ``--interval`` seconds of training; each session resumes exactly from the previous one's
checkpoint (the reused rollout included). Evaluation: the tiny world's 24 held-out prompts x ``--eval-seeds`` noise
seeds, the relative metric ``s("textured. p") - s("flat. p")`` (the SGP-style metric of the paper) and the analytic
judge's fidelity (mean of foreground, background and shape accuracy).

Quality target: ``--target-fraction`` (0.95) of the best held-out relative gain over the base that the official arm
reaches *without losing fidelity* (at evaluation points whose fidelity is at least the base's minus
``--fidelity-tolerance``, one image's worth of the judge by default), with fidelity at least that same floor. The
fraction keeps the target off the edge where, on the tiny world, more texture starts to cost fidelity: there the
relative metric moves by a few thousandths per evaluation while fidelity falls by tenths, and a target on the edge
would measure where the evaluation points happen to fall rather than speed. Time to quality of an arm: the training
seconds (the engine's step times: rollout, branches, optimizer; evaluation and checkpoints excluded) at which it
first meets both, the gain linearly interpolated between the two evaluation points around the crossing. Every arm
stops once its fidelity has collapsed (more than 0.1 below the floor: the tiny world's fidelity does not come back);
the official arm otherwise trains its ``--budget``; the other arms, evaluated more often (every cap /
``--points-to-target`` seconds), stop at the target or at ``--cap-factor`` x the official arm's time (then they are
slower than it: no ratio). The ratio is an arm's time over the official arm's.

Outputs under ``--out`` (default ``benchmarks/results/time_to_quality``): ``results.json`` (machine, every
evaluation point of every arm and seed), ``table.md`` and ``gain_vs_seconds.svg`` / ``fidelity_vs_seconds.svg``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_methods import clean, evaluate_point, machine_info, run_config  # noqa: E402

from directalign.report_plots import svg_plot  # noqa: E402

OFFICIAL = ["train.batch_size=1", "srpo.rollout_steps=25", "srpo.samples_per_rollout=1", "srpo.rollout_reuse=1",
            "srpo.denoise_branch=true", "srpo.inversion_branch=true", "train.learning_rate=3e-5"]
ARMS: dict[str, list[str]] = {
    "official": OFFICIAL,
    "b1-r16": OFFICIAL + ["srpo.rollout_steps=16"],
    "b1-r16-reuse2": OFFICIAL + ["srpo.rollout_steps=16", "srpo.rollout_reuse=2"],
    "b1-r16-reuse4": OFFICIAL + ["srpo.rollout_steps=16", "srpo.rollout_reuse=4"],
    "b1-r8-reuse4": OFFICIAL + ["srpo.rollout_steps=8", "srpo.rollout_reuse=4"],
    "b8-r16": OFFICIAL + ["train.batch_size=8", "srpo.rollout_steps=16"],
    "b8-r16-reuse4-lr1e-4": OFFICIAL + ["train.batch_size=8", "srpo.rollout_steps=16", "srpo.rollout_reuse=4",
                                        "train.learning_rate=1e-4"],
    "b4-r16-reuse4-lr6e-5": OFFICIAL + ["train.batch_size=4", "srpo.rollout_steps=16", "srpo.rollout_reuse=4",
                                        "train.learning_rate=6e-5"],
}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "time_to_quality"
COLLAPSE = 0.1  # fidelity this far below the floor: collapsed, the run stops
STEP_CAP = 1_000_000  # train.steps of every session: never reached, so every session is a partial one


def _quiet(*_a, **_k):
    pass


# ------------------------------------------------------------------------------------------------ pure pieces
def next_session_steps(train_seconds: float, steps_done: int, target_seconds: float, first: int = 4) -> int:
    """Steps to train so the run's training time lands near ``target_seconds``, from its seconds per step so far
    (``first`` steps when nothing is measured yet); at least one."""
    if steps_done == 0 or train_seconds <= 0:
        return first
    per_step = train_seconds / steps_done
    return max(1, round((target_seconds - train_seconds) / per_step))


def best_kept_gain(points: list[dict], base_relative: float, fidelity_floor: float) -> float:
    """The highest relative gain over the base among points whose fidelity is at least ``fidelity_floor`` (0 when
    none is)."""
    kept = [p["relative"] - base_relative for p in points if p["fidelity"] >= fidelity_floor]
    return max(kept, default=0.0)


def meets(point: dict, gain: float, fidelity: float, base_relative: float) -> bool:
    return point["relative"] - base_relative >= gain and point["fidelity"] >= fidelity


def time_to_reach(points: list[dict], base_relative: float, gain: float, fidelity: float) -> float | None:
    """Training seconds at which the relative gain first reaches ``gain`` at a point whose fidelity is at least
    ``fidelity``, linearly interpolated between that point and the one before (the base at 0 s before the first);
    None when no point meets both."""
    prev_t, prev_g = 0.0, 0.0
    for p in points:
        g = p["relative"] - base_relative
        if meets(p, gain, fidelity, base_relative):
            if prev_g >= gain:  # the gain was there before, the fidelity only now
                return p["train_seconds"]
            return prev_t + (gain - prev_g) / (g - prev_g) * (p["train_seconds"] - prev_t)
        prev_t, prev_g = p["train_seconds"], g
    return None


# --------------------------------------------------------------------------------------------------- one arm
def run_arm(name: str, overrides: list[str], seed: int, workdir: Path, eval_seeds: list[int], interval: float,
            budget: float, stop: tuple[float, float, float], at_target: bool, log=print) -> dict:
    """Train one arm in sessions ending every ``interval`` training seconds; evaluate after each. ``stop``:
    (gain, fidelity floor, base relative). Stops when a point meets it and ``at_target`` ("target"), when the
    fidelity falls more than ``COLLAPSE`` below the floor ("collapsed"), or at ``budget`` ("cap")."""
    from directalign.engine.finetune import resolve_device
    from directalign.eval.heldout import held_out_form
    from directalign.logging_utils import read_metrics
    from directalign.prompts import load_prompts
    from directalign.rewards.registry import load_reward
    from directalign.training import train

    run_dir = workdir / f"{name}-seed{seed}"
    cfg = run_config("srpo", seed, STEP_CAP, run_dir, eval_seeds, overrides)
    prompts = load_prompts(cfg.eval.prompts)
    reward = load_reward(cfg.reward, resolve_device(cfg.model.device), held_out_form(cfg)[0])
    points, done, seconds, t0, reason = [], 0, 0.0, time.time(), "cap"
    while seconds < budget:
        k = next_session_steps(seconds, done, min(budget, (len(points) + 1) * interval))
        result = train(cfg, resume=done > 0, overwrite=done == 0, max_steps_this_session=k, log=_quiet)
        rec = read_metrics(run_dir)
        done, seconds = rec[-1]["step"], sum(r["step_seconds"] for r in rec)
        point = evaluate_point(result.adapter, reward, cfg, prompts)
        point.update(step=done, train_seconds=seconds, nfe_no_grad=sum(r["nfe_no_grad"] for r in rec),
                     nfe_grad=sum(r["nfe_grad"] for r in rec))
        points.append(point)
        del result
        log(f"  {name} seed {seed}: step {done}, {seconds:.0f} s, relative {point['relative']:+.4f}, fidelity "
            f"{point['fidelity']:.4f}")
        if at_target and meets(point, *stop):
            reason = "target"
            break
        if point["fidelity"] < stop[1] - COLLAPSE:
            reason = "collapsed"
            break
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"arm": name, "seed": seed, "overrides": overrides, "points": points, "stopped": reason,
            "wall_seconds": time.time() - t0}


def base_point(workdir: Path, eval_seeds: list[int], shared: list[str]) -> dict:
    import torch

    from directalign.adapters.loading import load_adapter
    from directalign.engine.finetune import DTYPES, resolve_device
    from directalign.eval.heldout import held_out_form
    from directalign.prompts import load_prompts
    from directalign.rewards.registry import load_reward

    cfg = run_config("srpo", 42, 1, workdir / "base", eval_seeds, shared)
    device = resolve_device(cfg.model.device)
    torch.manual_seed(0)
    adapter = load_adapter(cfg.model, device, DTYPES[cfg.model.dtype])
    reward = load_reward(cfg.reward, device, held_out_form(cfg)[0])
    return evaluate_point(adapter, reward, cfg, load_prompts(cfg.eval.prompts))


# ------------------------------------------------------------------------------------------------- reporting
def summarise(report: dict) -> dict:
    """Per arm: time to the target per seed, its mean, the ratio to the official arm, and the end point."""
    base_rel, tgt = report["base"]["relative"], report["target"]
    official_times = [t for t in report["official_times"] if t is not None]
    t_off = statistics.mean(official_times) if official_times else None
    out = {}
    for name, runs in report["runs"].items():
        times = [time_to_reach(r["points"], base_rel, tgt["gain"], tgt["fidelity"]) for r in runs]
        ok = [t for t in times if t is not None]
        mean_t = statistics.mean(ok) if len(ok) == len(times) and ok else None
        last = [r["points"][-1] for r in runs]
        out[name] = {"times": times, "mean_seconds": mean_t,
                     "ratio_to_official": mean_t / t_off if mean_t is not None and t_off else None,
                     "end_gain": statistics.mean(p["relative"] - base_rel for p in last),
                     "end_fidelity": statistics.mean(p["fidelity"] for p in last),
                     "seconds_per_step": statistics.mean(p["train_seconds"] / p["step"] for p in last),
                     "steps": [p["step"] for p in last], "stopped": [r.get("stopped", "cap") for r in runs]}
    return out


def markdown(report: dict) -> str:
    m, tgt, s = report["machine"], report["target"], report["summary"]
    lines = ["# Time to quality: SRPO on the tiny world", "", f"Command: `{report['command']}`", "",
             f"Machine: {m['platform']}, {m['cpus']} CPUs ({m.get('cpu_model', '?')}), torch {m['torch']} "
             f"({m['threads']} threads), device {m['device']}; nothing else ran. Started {report['started']}, "
             f"{report['total_seconds'] / 60:.1f} min in all.", "",
             f"Base model: relative {report['base']['relative']:+.4f}, fidelity {report['base']['fidelity']:.4f} "
             f"({len(report['eval_seeds']) * 24} held-out images).",
             f"Target: relative gain >= {tgt['gain']:.4f} ({tgt['fraction']:.2f} x {tgt['best_gain']:.4f}, the "
             f"official arm's best gain at fidelity >= the base's minus {report['fidelity_tolerance']:.4f}, mean over "
             f"seeds) with fidelity >= {tgt['fidelity']:.4f}. Runs stop when fidelity collapses (below "
             f"{tgt['fidelity'] - COLLAPSE:.4f}); the other arms also at the target or after "
             f"{report['cap_seconds']:.0f} s, evaluated every {report['other_interval']:.1f} s of training (the "
             f"official arm every {report['interval']:.0f} s).", "",
             "| Arm | Overrides | s/step | Steps | Time to target (s) | Ratio to official | End gain | End fidelity "
             "| Stopped |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in s.items():
        t, ratio = row["mean_seconds"], row["ratio_to_official"]
        times = ", ".join("-" if x is None else f"{x:.0f}" for x in row["times"])
        own = report["arms"].get(name, [])
        own = own if name == "official" else own[len(OFFICIAL):] if own[:len(OFFICIAL)] == OFFICIAL else own
        lines.append(f"| {name} | `{' '.join(own)}` | {row['seconds_per_step']:.3f} | "
                     f"{'/'.join(map(str, row['steps']))} | {times if t is None else f'{t:.0f} ({times})'} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"{row['end_gain']:+.4f} | {row['end_fidelity']:.4f} | {', '.join(row['stopped'])} |")
    lines += ["", "Time: training seconds (the engine's step times), evaluation and checkpoints excluded; crossing "
              "interpolated between evaluation points. '-': not reached within the budget.", "",
              "![relative gain against training seconds](gain_vs_seconds.svg)", "",
              "![fidelity against training seconds](fidelity_vs_seconds.svg)", ""]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "?"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ", ".join(ARMS)
                   + " (official always runs: it sets the target)")
    p.add_argument("--budget", type=float, default=150.0, help="training seconds of the official arm (default 150)")
    p.add_argument("--cap-factor", type=float, default=1.2,
                   help="the other arms stop at this multiple of the official arm's time to the target (default 1.2)")
    p.add_argument("--interval", type=float, default=10.0,
                   help="training seconds between evaluations of the official arm (default 10)")
    p.add_argument("--points-to-target", type=int, default=12,
                   help="other arms: an evaluation every cap / this many seconds, if more often (default 12)")
    p.add_argument("--seeds", type=int, default=1, help="training seeds 42, 43, ... (default 1)")
    p.add_argument("--eval-seeds", default="0,1,2,3", help="noise seeds of the held-out evaluation")
    p.add_argument("--target-fraction", type=float, default=0.95,
                   help="the target is this share of the official arm's best gain that kept fidelity (default 0.95)")
    p.add_argument("--fidelity-tolerance", type=float, default=None,
                   help="fidelity below the official end still counted as the same (default: 1 / images)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every arm and the base (e.g. eval.steps=8); arms' own keys win")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {unknown}; choose from {', '.join(ARMS)}")
    args.arms = ["official"] + [a for a in arms if a != "official"]
    if args.budget <= 0 or args.interval <= 0 or args.seeds < 1 or args.cap_factor <= 0 or args.points_to_target < 1 \
            or not 0 < args.target_fraction <= 1:
        raise SystemExit("--budget, --cap-factor, --interval, --points-to-target and --seeds must be positive, "
                         "--target-fraction in (0, 1]")
    return args


def main(argv=None, log=print) -> dict:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--render"] and len(argv) == 2:
        out = Path(argv[1])
        report = json.loads((out / "results.json").read_text())
        render(report, out)
        return report
    args = parse_args(argv)
    from directalign.compat import quiet_loading

    quiet_loading()
    t_start = time.time()
    eval_seeds = [int(s) for s in args.eval_seeds.split(",") if s.strip()]
    tol = args.fidelity_tolerance if args.fidelity_tolerance is not None else 1 / (24 * len(eval_seeds))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="time-to-quality-"))
    seeds = [42 + i for i in range(args.seeds)]
    try:
        base = base_point(workdir, eval_seeds, args.set)
        log(f"base: relative {base['relative']:+.4f}, fidelity {base['fidelity']:.4f}")
        floor = base["fidelity"] - tol
        runs = {"official": [run_arm("official", args.set + ARMS["official"], s, workdir, eval_seeds,
                                     args.interval, args.budget, (math.inf, floor, base["relative"]), False, log)
                             for s in seeds]}
        best = statistics.mean(best_kept_gain(r["points"], base["relative"], floor) for r in runs["official"])
        target = {"gain": args.target_fraction * best, "fidelity": floor, "best_gain": best,
                  "fraction": args.target_fraction}
        stop = (target["gain"], target["fidelity"], base["relative"])
        official_times = [time_to_reach(r["points"], base["relative"], target["gain"], target["fidelity"])
                          for r in runs["official"]]
        reached = [t for t in official_times if t is not None]
        cap = min(args.budget, args.cap_factor * statistics.mean(reached)) if reached else args.budget
        # faster arms cross the target (and, on the tiny world, overshoot it) sooner: evaluate them more often
        fine = min(args.interval, cap / args.points_to_target)
        log(f"target: relative gain {target['gain']:.4f}, fidelity >= {target['fidelity']:.4f}; official time "
            f"{official_times}; other arms capped at {cap:.0f} s")
        for arm in args.arms[1:]:
            runs[arm] = [run_arm(arm, args.set + ARMS[arm], s, workdir, eval_seeds, fine, cap, stop, True, log)
                         for s in seeds]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    machine = dict(machine_info(), cpu_model=cpu_model())
    report = {"command": "python benchmarks/time_to_quality.py " + " ".join(argv),
              "machine": machine, "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(t_start)),
              "overrides": args.set, "budget": args.budget, "interval": args.interval, "eval_seeds": eval_seeds,
              "seeds": seeds,
              "fidelity_tolerance": tol, "base": base, "target": target, "arms": {a: ARMS[a] for a in args.arms},
              "official_times": official_times, "cap_seconds": cap,
              "other_interval": fine,
              "runs": runs}
    report["summary"] = summarise(report)
    report["total_seconds"] = time.time() - t_start
    (out / "results.json").write_text(json.dumps(clean(report), indent=1))
    render(report, out)
    log(markdown(report))
    return report


def render(report: dict, out: Path) -> None:
    """table.md and the two plots from a report (``--render DIR`` redraws them from DIR/results.json)."""
    (out / "table.md").write_text(markdown(report))
    base, target = report["base"], report["target"]
    for key, fname, ylabel in (("gain", "gain_vs_seconds.svg", "held-out relative gain over the base"),
                               ("fidelity", "fidelity_vs_seconds.svg", "fidelity (analytic judge)")):
        series = {name: [(p["train_seconds"], (p["relative"] - base["relative"]) if key == "gain" else p["fidelity"])
                         for p in rs[0]["points"]] for name, rs in report["runs"].items()}
        ref = target["gain"] if key == "gain" else base["fidelity"]
        (out / fname).write_text(svg_plot(series, ref, f"SRPO on the tiny world: {ylabel} vs training time",
                                          "training seconds (log scale)", ylabel,
                                          baseline_label="target" if key == "gain" else "base model"))


if __name__ == "__main__":
    main()
