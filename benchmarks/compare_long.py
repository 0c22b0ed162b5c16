"""The long method comparison on the tiny world: every (method, seed) run trains until its own objective on held-out
prompts stops improving (a plateau) or a cap, with evaluation points all along; then the compute each method needs to
reach SRPO's final level (issue 13, item 6). Chunked: one invocation per method, merged without running anything.

    python benchmarks/compare_long.py --methods srpo --seeds 3 --out benchmarks/results/compare_long/srpo
    python benchmarks/compare_long.py --methods grpo --seeds 3 --out benchmarks/results/compare_long/grpo
    python benchmarks/compare_long.py --merge benchmarks/results/compare_long/srpo benchmarks/results/compare_long/grpo \
        --out benchmarks/results/compare_long

Runs. Each method from its shipped ``configs/tiny-<method>.yaml`` (the settings of
``benchmarks/compare_methods.py``, whose evaluation this reuses), ``train.steps`` unbounded (so the learning-rate
schedule must be constant and ``train.ema_decay`` 0: both would otherwise depend on it). A run trains in sessions of
about ``--eval-every-seconds`` of training (the engine's step times; evaluation excluded), each resuming exactly from
the previous session's checkpoint, and is evaluated after each session on the 24 held-out prompts x
``--eval-seeds``. It stops at the first evaluation where (a) its own objective (the method's training reward in its
held-out form, ``evaluate_point``'s ``own_objective``) has not beaten the best so far (the base model's value first)
by more than ``--plateau-delta`` for ``--plateau-patience`` evaluations in a row, once it has trained
``--min-minutes`` (the first session is 4 steps, to measure the step time; its early point counts): "plateau"; or
(b) its training seconds reach ``--cap-minutes`` (or its step ``--max-steps``): "cap". ``--session-steps N`` makes
every session N steps instead of a time share (exact reruns). Each method's base model is evaluated under its own
config, which gives its own objective's starting value. ``--quick``: a ~15-minute subset (one method of each family
of objectives, one seed, 2-minute cap; 11.9 min on 2 cores, ``benchmarks/results/compare_long_quick/``).

Outputs under ``--out``: ``results.json`` (per run: every evaluation point with step, NFE with and without gradient,
training seconds and every metric; the stop reason; per method its base point; plus the analysis of
``compare_reach``), ``table.md`` (finals, "Compute to reach SRPO's level", own-objective rise against the seed
spread, drift warnings) and SVG curves of held-out reward, relative metric, fidelity and the drift indicators
(dark share, brightness, saturation, colourfulness, high-frequency energy, pixel diversity) against NFE and against
training seconds.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_methods import (
    LABELS,
    METHODS,
    QUICK_METHODS,
    evaluate_point,
    machine_info,
    peak_memory_mb,
    run_config,
    run_worker,
)
from compare_reach import CompareError, merge, read_report, stop_reason, write_outputs
from time_to_quality import next_session_steps

from directalign.errors import UserError

STEP_CAP = 1_000_000  # train.steps of every run: never reached, so every session is a partial one
SHARED_BASE = ("reward", "relative", "fidelity", "textured_share", "dark_share", "judge", "saturation", "brightness",
               "colourfulness", "hf_energy", "diversity_pixel")


def _quiet(*_a, **_k):
    pass


def check_config(method: str, eval_seeds: list[int], overrides: list[str], workdir: Path) -> None:
    """The run's config builds and does not depend on train.steps (which is unbounded here)."""
    cfg = run_config(method, 42, STEP_CAP, workdir / "check", eval_seeds, overrides)
    if cfg.run.log_every != 1:
        raise CompareError(f"{method}: run.log_every={cfg.run.log_every}; the NFE and seconds are summed over every "
                           "step's record: drop that --set override")
    if cfg.train.lr_schedule != "constant" or cfg.train.ema_decay > 0 or cfg.train.warmup_steps > 0:
        raise CompareError(f"{method}: train.lr_schedule={cfg.train.lr_schedule}, train.warmup_steps="
                           f"{cfg.train.warmup_steps}, train.ema_decay={cfg.train.ema_decay} depend on train.steps, "
                           "which runs until a plateau leave unbounded; drop those --set overrides")


# ---------------------------------------------------------------------------------------------------- workers
def worker_base(spec: dict) -> dict:
    """The base model evaluated under one method's config: the x = 0 point of its curves and its own objective's
    starting value."""
    import torch

    from directalign.adapters.loading import load_adapter
    from directalign.engine.finetune import DTYPES, resolve_device
    from directalign.eval.heldout import held_out_form
    from directalign.prompts import load_prompts
    from directalign.rewards.registry import load_reward

    t0 = time.time()
    cfg = run_config(spec["method"], 42, 1, Path(spec["workdir"]) / "base", spec["eval_seeds"], spec["overrides"])
    device = resolve_device(cfg.model.device)
    torch.manual_seed(0)
    adapter = load_adapter(cfg.model, device, DTYPES[cfg.model.dtype])
    reward = load_reward(cfg.reward, device, held_out_form(cfg)[0])
    point = evaluate_point(adapter, reward, cfg, load_prompts(cfg.eval.prompts))
    return {"point": point, "eval_seconds": time.time() - t0}


def worker_run(spec: dict) -> dict:
    """Train one (method, seed) in sessions, evaluating after each, until a plateau or the cap."""
    from directalign.engine.finetune import resolve_device
    from directalign.eval.heldout import held_out_form
    from directalign.logging_utils import read_metrics
    from directalign.prompts import load_prompts
    from directalign.rewards.registry import load_reward
    from directalign.training import train

    t0 = time.time()
    run_dir = Path(spec["run_dir"])
    cfg = run_config(spec["method"], spec["seed"], STEP_CAP, run_dir, spec["eval_seeds"], spec["overrides"])
    prompts = load_prompts(cfg.eval.prompts)
    reward = load_reward(cfg.reward, resolve_device(cfg.model.device), held_out_form(cfg)[0])
    every, cap = spec["eval_every_seconds"], spec["cap_minutes"] * 60
    own, points, done, seconds, reason = [spec["base_own"]], [], 0, 0.0, None
    while reason is None:
        k = spec["session_steps"] or next_session_steps(seconds, done, min(cap, (len(points) + 1) * every))
        if spec["max_steps"]:
            k = min(k, spec["max_steps"] - done)
        result = train(cfg, resume=done > 0, overwrite=done == 0, max_steps_this_session=k, log=_quiet)
        rec = read_metrics(run_dir)
        done, seconds = rec[-1]["step"], sum(r["step_seconds"] for r in rec)
        point = evaluate_point(result.adapter, reward, cfg, prompts)
        del result
        point.update(step=done, nfe_no_grad=sum(r["nfe_no_grad"] for r in rec),
                     nfe_grad=sum(r["nfe_grad"] for r in rec), train_seconds=seconds,
                     skipped_steps=sum(bool(r.get("skipped")) for r in rec))
        points.append(point)
        own.append(point["own_objective"])
        reason = stop_reason(own, seconds, done, spec["plateau_delta"], spec["plateau_patience"], cap,
                             spec["max_steps"], spec["min_minutes"] * 60)
    if not spec.get("keep_run"):
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"method": spec["method"], "seed": spec["seed"], "points": points, "stop_reason": reason,
            "steps": done, "peak_memory_mb": peak_memory_mb(), "wall_seconds": time.time() - t0}


WORKERS = {"base": worker_base, "run": worker_run}


def call_worker(kind: str, spec: dict, in_process: bool, log_dir: Path) -> dict:
    """A worker of this script in this process or (default) in a fresh one (compare_methods.run_worker)."""
    return run_worker(WORKERS, Path(__file__).resolve(), kind, spec, in_process, log_dir)


# ------------------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="", help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, default=3, help="training seeds per method (42, 43, ...); default 3")
    p.add_argument("--eval-every-seconds", type=float, default=60.0,
                   help="training seconds per session, i.e. between evaluations (default 60)")
    p.add_argument("--plateau-delta", type=float, default=0.002,
                   help="an improvement of the own objective counts only above this (default 0.002)")
    p.add_argument("--plateau-patience", type=int, default=3,
                   help="evaluations in a row without such an improvement that stop a run (default 3)")
    p.add_argument("--min-minutes", type=float, default=5.0,
                   help="training minutes before a plateau may stop a run (default 5)")
    p.add_argument("--cap-minutes", type=float, default=40.0, help="training minutes per run at most (default 40)")
    p.add_argument("--max-steps", type=int, default=0, help="optimizer steps per run at most (default: no limit)")
    p.add_argument("--session-steps", type=int, default=0,
                   help="fixed steps per session instead of --eval-every-seconds (exact reruns)")
    p.add_argument("--eval-seeds", default="0,1,2,3", help="noise seeds of the held-out evaluation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override: a shared key applies to every method, a method section's key to its methods")
    p.add_argument("--out", default="", help="output directory (required)")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="combine the results.json of these output directories into --out; runs nothing")
    p.add_argument("--workdir", default="", help="where runs live (default: a temporary directory, removed)")
    p.add_argument("--keep-runs", action="store_true", help="keep run directories")
    p.add_argument("--in-process", action="store_true", help="run everything in this process")
    p.add_argument("--quick", action="store_true",
                   help=f"a ~15-minute subset: {', '.join(QUICK_METHODS)} (unless --methods), 1 seed, --cap-minutes 2, "
                        "--min-minutes 1, --eval-every-seconds 30")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return args
    if not args.out:
        raise CompareError("--out: give the output directory, e.g. --out benchmarks/results/compare_long/srpo")
    if args.merge:
        return args
    if args.quick:
        args.methods = args.methods or ",".join(QUICK_METHODS)
        args.seeds, args.cap_minutes, args.min_minutes, args.eval_every_seconds = 1, 2.0, 1.0, 30.0
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        raise CompareError(f"--methods: unknown or none {unknown}; choose from {', '.join(METHODS)}")
    if (args.seeds < 1 or args.plateau_patience < 1 or args.eval_every_seconds <= 0 or args.cap_minutes <= 0
            or args.plateau_delta < 0 or args.max_steps < 0 or args.session_steps < 0 or args.min_minutes < 0):
        raise CompareError("--seeds, --plateau-patience, --eval-every-seconds and --cap-minutes must be positive, "
                           "--plateau-delta, --min-minutes, --max-steps and --session-steps >= 0")
    return args


def main(argv=None, log=print) -> dict | None:
    args = parse_args(argv)
    from directalign.compat import quiet_loading

    quiet_loading()
    command = "python benchmarks/compare_long.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    if args.worker:
        Path(args.result).write_text(json.dumps(WORKERS[args.worker](json.loads(Path(args.spec).read_text()))))
        return None
    if args.merge:
        report = merge([read_report(Path(d)) for d in args.merge], list(args.merge))
        report["merge_command"] = command
        write_outputs(report, out)
        log(f"merged {', '.join(report['methods'])} into {out}")
        return report

    t_start = time.time()
    eval_seeds = [int(s) for s in args.eval_seeds.split(",") if s.strip()]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="compare-long-"))
    workdir.mkdir(parents=True, exist_ok=True)
    common = {"workdir": str(workdir), "eval_seeds": eval_seeds, "overrides": list(args.set)}
    settings = {"eval_every_seconds": args.eval_every_seconds, "plateau_delta": args.plateau_delta,
                "plateau_patience": args.plateau_patience, "min_minutes": args.min_minutes,
                "cap_minutes": args.cap_minutes,
                "max_steps": args.max_steps, "session_steps": args.session_steps, "overrides": list(args.set)}
    for m in args.methods:  # every config must build and fit before anything runs
        check_config(m, eval_seeds, args.set, workdir)
    methods: dict[str, dict] = {}
    try:
        for m in args.methods:
            base = call_worker("base", dict(common, method=m), args.in_process, out / "logs")
            log(f"{LABELS.get(m, m)} base: own objective {base['point']['own_objective']:.4f}, relative "
                f"{base['point']['relative']:+.4f}, fidelity {base['point']['fidelity']:.4f}")
            runs = []
            for i in range(args.seeds):
                seed = 42 + i
                spec = dict(common, **{k: v for k, v in settings.items() if k != "overrides"}, method=m, seed=seed,
                            base_own=base["point"]["own_objective"], run_dir=str(workdir / f"{m}-seed{seed}"),
                            keep_run=args.keep_runs)
                r = call_worker("run", spec, args.in_process, out / "logs")
                runs.append(r)
                f = r["points"][-1]
                log(f"{LABELS.get(m, m)} seed {seed}: {r['stop_reason']} at step {r['steps']} "
                    f"({f['train_seconds']:.0f} s training, {len(r['points'])} evaluations), own objective "
                    f"{f['own_objective']:.4f}, relative {f['relative']:+.4f}, fidelity {f['fidelity']:.4f}")
            methods[m] = {"base": base["point"], "runs": runs, "settings": settings}
    finally:
        if not args.workdir and not args.keep_runs:
            shutil.rmtree(workdir, ignore_errors=True)
    first = methods[args.methods[0]]["base"]
    report = {"kind": "compare_long", "command": command, "machine": machine_info(),
              "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(t_start)),
              "total_seconds": time.time() - t_start, "settings": settings, "eval_seeds": eval_seeds,
              "train_seeds": [42 + i for i in range(args.seeds)],
              "base": dict({k: first.get(k) for k in SHARED_BASE}, own_objective=None), "methods": methods}
    write_outputs(report, out)
    log(f"wrote {out / 'results.json'}, {out / 'table.md'} and the curves")
    return report


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        sys.exit(f"error: {e}")
