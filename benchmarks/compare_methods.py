"""Every alignment method on the tiny world through the same engine: a table like the SRPO paper's Table 1 and a plot
of held-out reward against the number of model evaluations (NFE).

    python benchmarks/compare_methods.py                       # every method x 3 seeds in a 42-minute budget
    python benchmarks/compare_methods.py --quick               # SRPO, Flow-GRPO, NFT, DPO, AWM, 1 seed, 15 minutes
    python benchmarks/compare_methods.py --plan-only           # calibrate, print the planned steps and time, stop
    python benchmarks/compare_methods.py --methods srpo,grpo --seeds 1 --steps all=20

Methods: every registered method with a ``tiny-<method>.yaml`` (SRPO, Direct-Align, ReFL, DRaFT-K, DRaFT-LV,
AlignProp, DanceGRPO, Flow-GRPO-Fast, DiffusionNFT, Diffusion-DPO, AWM, then Flow-GRPO: ``VARIANTS``), each from
its shipped ``configs/tiny-<method>.yaml`` (same LoRA, optimiser and evaluation settings), each trained by
:func:`directalign.training.train` and evaluated by :func:`directalign.eval.heldout.evaluate`.

Budget. ``--budget-minutes`` is the whole comparison's wall clock. The script measures the base model's evaluation,
then (unless ``--steps`` fixes them) each method's seconds per optimizer step on this machine (3 steps through the
engine), and gives every (method, seed) run the same training wall clock: steps = that share / the method's seconds
per step, capped at the config's ``train.steps`` (``--max-steps``). Step counts are therefore machine-dependent; they
are recorded, and ``--steps METHOD=N`` (or ``all=N``) fixes them for exact reruns. Seeds: training seeds 42, 43, ...
(``--seeds``, default 3, every row); evaluation prompts (the 24 held-out attribute combinations) and noise seeds
(``--eval-seeds``) are fixed, so every method is scored on the same images' noise.

Columns (all on held-out prompts, mean +- std over training seeds):

* held-out reward -- the tiny world's absolute reward ``s(image, prompt)``, the score every baseline trains on (the
  paper's HPS column); SRPO trains on a relative form, so this is not its own objective;
* relative -- the SGP-style ``s("textured. p") - s("flat. p")`` (the paper's SGP-HPS column, with the tiny world's
  texture words); own objective -- the run's training reward as ``summary.json`` defines it;
* fidelity -- the analytic judge's mean rate of correct foreground colour, background colour and shape; textured /
  dark -- the share of images judged textured / dark (style drift);
* hacking indicators -- saturation, brightness, colourfulness, high-frequency energy and pixel diversity
  (:mod:`directalign.metrics`), with drift warnings against the base model;
* cost -- NFE without and with gradient (summed over the run's steps), training seconds (the engine's step times,
  evaluation excluded) and the peak resident memory of the run's process (each run is its own process unless
  ``--in-process``; on GPU the peak allocated memory).

Outputs under ``--out`` (default ``benchmarks/results/compare_methods``): ``results.json`` (everything, per run and
per evaluation point), ``table.md`` (command, machine, budget, the table, warnings) and ``reward_vs_nfe.svg``
(plus ``reward_vs_nfe.png`` when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

from directalign.report_plots import svg_plot


def config_file(method: str) -> Path:
    return Path(str(resources.files("directalign"))) / "configs" / f"tiny-{method}.yaml"


def _registered_methods() -> tuple[str, ...]:
    from directalign.methods.registry import METHODS as registered

    return tuple(registered)


# Shipped tiny configs that run a registered method with another code's settings, compared under their own name.
VARIANTS = {"flow-grpo": "grpo"}  # tiny-flow-grpo.yaml: Flow-GRPO's settings of method grpo (tiny-grpo: DanceGRPO's)


def registered_method(name: str) -> str:
    """The registered method a comparison entry runs (a variant's method, else the name itself)."""
    return VARIANTS.get(name, name)


# Every registered method that ships a tiny-world config (tiny-<method>.yaml) takes part, then the variants.
METHODS = tuple(m for m in (*_registered_methods(), *VARIANTS) if config_file(m).is_file())
QUICK_METHODS = ("srpo", "flow-grpo", "nft", "dpo", "awm")  # one of each family of objectives
LABELS = {"srpo": "SRPO", "direct-align": "Direct-Align", "refl": "ReFL", "draft-k": "DRaFT-K",
          "draft-lv": "DRaFT-LV", "alignprop": "AlignProp", "grpo": "DanceGRPO", "flow-grpo": "Flow-GRPO",
          "grpo-fast": "Flow-GRPO-Fast", "nft": "DiffusionNFT", "dpo": "Diffusion-DPO (online)",
          "awm": "AWM"}  # display names; default: the name
METRIC_KEYS = ("reward", "relative", "own_objective", "fidelity", "textured_share", "dark_share", "saturation",
               "brightness", "colourfulness", "hf_energy", "diversity_pixel")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "compare_methods"


def _quiet(*_a, **_k):
    pass




def own_overrides(method: str, overrides: list[str]) -> list[str]:
    """The ``--set`` overrides that apply to ``method``: shared sections always, a method section only to the methods
    it belongs to (``--set grpo.eta=0.5`` changes the GRPO runs and no other)."""
    from directalign.methods.registry import sections

    owners, runs = sections(), registered_method(method)
    return [o for o in overrides if runs in owners.get(o.split(".", 1)[0], [runs])]


def run_config(method: str, seed: int, steps: int, run_dir: Path, eval_seeds: list[int], overrides: list[str]):
    from directalign.config import build_config
    from directalign.engine.config import load_yaml

    fixed = [f"train.steps={steps}", f"train.seed={seed}", f"run.output_dir={run_dir}", "run.checkpoint_every=0",
             "run.progress=false", "run.report=false", "eval.before=false", "eval.best_of=1",
             f"eval.seeds={list(eval_seeds)}"]
    return build_config(load_yaml(config_file(method)), fixed + own_overrides(method, overrides))


def config_steps(method: str, overrides: list[str]) -> int:
    """``train.steps`` of the method's shipped config (with the --set overrides): the cap on planned steps."""
    from directalign.config import build_config
    from directalign.engine.config import load_yaml

    return build_config(load_yaml(config_file(method)), own_overrides(method, overrides)).train.steps


def eval_points(steps: int, n: int) -> list[int]:
    """``n`` evaluation steps spread over 1..steps, always ending at ``steps``."""
    return sorted({max(1, round(steps * i / n)) for i in range(1, n + 1)} | {steps})


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate_point(adapter, reward, cfg, prompts: list[str]) -> dict:
    """Everything the table needs about one model, on the held-out prompts and fixed seeds."""
    from directalign import metrics as M
    from directalign.eval.heldout import evaluate
    from directalign.eval.scoring import TINY_RELATIVE_WORDS, RewardSpec, score_images

    res = evaluate(adapter, reward, cfg, prompts, judge_world=True)
    scores = score_images(RewardSpec("tiny-world", reward, *TINY_RELATIVE_WORDS), res.images, res.prompts)
    judge = res.judge or {}
    named = [judge[k] for k in ("fg", "bg", "shape") if k in judge]
    out = {
        "reward": float(scores["score"].mean()),
        "relative": float(scores["relative"].mean()),
        "relative_se": float(scores["relative"].std() / math.sqrt(scores["relative"].numel())),  # standard error
        "own_objective": float(res.reward),
        "fidelity": sum(named) / len(named) if named else None,
        "textured_share": judge.get("textured_share"),
        "dark_share": judge.get("dark_share"),
        "judge": judge,
        **{k: float(v.mean()) for k, v in M.image_indicators(res.images).items()},
        "diversity_pixel": M.diversity(res.images, res.prompts),
    }
    return out


# ---------------------------------------------------------------------------------------------------- workers
def worker_base(spec: dict) -> dict:
    """The base model (no training), evaluated once: the NFE = 0 point of every curve and the drift reference."""
    import torch

    from directalign.adapters.loading import load_adapter
    from directalign.engine.finetune import DTYPES, resolve_device
    from directalign.eval.heldout import held_out_form
    from directalign.prompts import load_prompts
    from directalign.rewards.registry import load_reward

    t0 = time.time()
    cfg = run_config("srpo", 42, 1, Path(spec["workdir"]) / "base", spec["eval_seeds"], spec["overrides"])
    device = resolve_device(cfg.model.device)
    torch.manual_seed(0)
    adapter = load_adapter(cfg.model, device, DTYPES[cfg.model.dtype])
    reward = load_reward(cfg.reward, device, held_out_form(cfg)[0])
    t1 = time.time()
    point = evaluate_point(adapter, reward, cfg, load_prompts(cfg.eval.prompts))
    point["own_objective"] = None  # each method's own objective differs; the base has none of its own
    t2 = time.time()
    return {"point": point, "load_seconds": t1 - t0, "eval_seconds": t2 - t1, "n_images": len(cfg.eval.seeds) * 24}


def worker_calibrate(spec: dict) -> dict:
    """Seconds per optimizer step of one method: 4 engine steps, the median of the last three."""
    from directalign.logging_utils import read_metrics
    from directalign.training import train

    run_dir = Path(spec["workdir"]) / f"calibrate-{spec['method']}"
    cfg = run_config(spec["method"], 42, 5, run_dir, spec["eval_seeds"], spec["overrides"])
    train(cfg, overwrite=True, max_steps_this_session=4, log=_quiet)
    rec = read_metrics(run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    return {"seconds_per_step": statistics.median(r["step_seconds"] for r in rec[1:]),
            "nfe_no_grad": rec[-1]["nfe_no_grad"], "nfe_grad": rec[-1]["nfe_grad"]}


def worker_run(spec: dict) -> dict:
    """Train one (method, seed) in sessions that end at the evaluation points; evaluate after each."""
    from directalign.engine.finetune import resolve_device
    from directalign.eval.heldout import held_out_form
    from directalign.logging_utils import read_metrics
    from directalign.prompts import load_prompts
    from directalign.rewards.registry import load_reward
    from directalign.training import train

    t0 = time.time()
    run_dir = Path(spec["run_dir"])
    cfg = run_config(spec["method"], spec["seed"], spec["steps"], run_dir, spec["eval_seeds"], spec["overrides"])
    if cfg.train.lr_schedule == "constant" and cfg.train.ema_decay == 0:
        # Every session is then a partial one (the schedule does not depend on train.steps and no EMA is swapped
        # in at the end), so the engine's own final evaluation and export, which this script would repeat, are
        # skipped; the trained weights are the same.
        cfg = run_config(spec["method"], spec["seed"], spec["steps"] + 1, run_dir, spec["eval_seeds"],
                         spec["overrides"])
    prompts = load_prompts(cfg.eval.prompts)
    reward = load_reward(cfg.reward, resolve_device(cfg.model.device), held_out_form(cfg)[0])
    points, prev = [], 0
    for p in eval_points(spec["steps"], spec["eval_points"]):
        result = train(cfg, resume=prev > 0, overwrite=prev == 0, max_steps_this_session=p - prev, log=_quiet)
        point = evaluate_point(result.adapter, reward, cfg, prompts)
        rec = [r for r in read_metrics(run_dir) if r["step"] <= p]
        point.update(step=p, nfe_no_grad=sum(r["nfe_no_grad"] for r in rec),
                     nfe_grad=sum(r["nfe_grad"] for r in rec), train_seconds=sum(r["step_seconds"] for r in rec),
                     skipped_steps=sum(bool(r.get("skipped")) for r in rec))
        points.append(point)
        prev = p
        del result
    if not spec.get("keep_run"):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "export", ignore_errors=True)
    return {"method": spec["method"], "seed": spec["seed"], "steps": spec["steps"], "points": points,
            "peak_memory_mb": peak_memory_mb(), "wall_seconds": time.time() - t0}


WORKERS = {"base": worker_base, "calibrate": worker_calibrate, "run": worker_run}


def run_worker(workers: dict, script: Path, kind: str, spec: dict, in_process: bool, log_dir: Path) -> dict:
    """``workers[kind](spec)`` in this process, or (default) in a fresh one that runs ``script --worker kind``, so
    that its peak memory is its own; the fresh process's output goes to ``log_dir/<kind>-<method>[-seedN].log``."""
    if in_process:
        return workers[kind](spec)
    log_dir.mkdir(parents=True, exist_ok=True)
    name = f"{kind}-{spec.get('method', 'base')}" + (f"-seed{spec['seed']}" if "seed" in spec else "")
    spec_path, out_path = log_dir / f"{name}.spec.json", log_dir / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    out_path.unlink(missing_ok=True)
    with open(log_dir / f"{name}.log", "w") as fh:
        proc = subprocess.run([sys.executable, str(script), "--worker", kind, "--spec", str(spec_path), "--result",
                               str(out_path)], stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0 or not out_path.is_file():
        tail = (log_dir / f"{name}.log").read_text()[-3000:]
        raise RuntimeError(f"worker {name} failed (exit {proc.returncode}); log tail:\n{tail}")
    result = json.loads(out_path.read_text())
    spec_path.unlink()
    out_path.unlink()  # everything it held goes into results.json; the log stays
    return result


def call_worker(kind: str, spec: dict, in_process: bool, log_dir: Path) -> dict:
    """A worker of this script (:func:`run_worker`)."""
    return run_worker(WORKERS, Path(__file__).resolve(), kind, spec, in_process, log_dir)


# ------------------------------------------------------------------------------------------------- planning
def parse_steps(items: list[str], methods: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in items:
        key, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--steps {item!r}: expected METHOD=N or all=N with N >= 1")
        for m in (methods if key == "all" else [key]):
            if m not in METHODS:
                raise SystemExit(f"--steps {item!r}: unknown method {m!r}; choose from {', '.join(METHODS)}")
            out[m] = int(value)
    return out


def plan_steps(methods, fixed, calib, per_run_train_seconds, max_steps) -> dict[str, int]:
    steps = {}
    for m in methods:
        if m in fixed:
            steps[m] = fixed[m]
        else:
            steps[m] = int(min(max_steps[m], max(2, per_run_train_seconds // calib[m]["seconds_per_step"])))
    return steps


# ------------------------------------------------------------------------------------------------- reporting
def mean_std(values: list) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def aggregate(runs: list[dict]) -> dict:
    finals = [r["points"][-1] for r in runs]
    agg = {k: mean_std([f.get(k) for f in finals]) for k in METRIC_KEYS}
    for k in ("nfe_no_grad", "nfe_grad", "train_seconds"):
        agg[k] = mean_std([f[k] for f in finals])
    agg["peak_memory_mb"] = mean_std([r["peak_memory_mb"] for r in runs])
    agg["steps"] = runs[0]["steps"]
    agg["seeds"] = [r["seed"] for r in runs]
    # mean curve over seeds (the evaluation steps are the same for every seed of a method)
    curve = []
    for i, pt in enumerate(runs[0]["points"]):
        rewards = [r["points"][i]["reward"] for r in runs]
        curve.append({"step": pt["step"], "nfe": pt["nfe_no_grad"] + pt["nfe_grad"],
                      "reward": statistics.fmean(rewards)})
    agg["curve"] = curve
    return agg


def fmt(ms: tuple, digits: int = 4) -> str:
    """``mean ± std`` (std only over two or more seeds); large numbers without decimals."""
    m, s = ms
    if m is None or not math.isfinite(m):
        return "-"
    if abs(m) >= 1000:
        return f"{m:,.0f}" + (f" ± {s:,.0f}" if s is not None else "")
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def clean(obj):
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    return obj


def markdown(report: dict) -> str:
    from directalign import metrics as M

    base = report["base"]["point"]
    lines = [
        "# Method comparison on the tiny world", "",
        f"Command: `{report['command']}`", "",
        f"Machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, torch "
        f"{report['machine']['torch']} ({report['machine']['threads']} threads), device {report['machine']['device']}.",
        f"Started {report['started']}, total wall clock {report['total_seconds'] / 60:.1f} min "
        f"(budget {report['budget_minutes']} min).", "",
        (f"Training budget per run: {report['per_run_train_seconds']:.0f} s of optimizer steps, equal for every "
         "method (steps = budget / the method's measured seconds per step, capped at its config's train.steps)"
         if report["calibration"] else "Steps fixed by --steps (no time budget)")
        + "; evaluation on the tiny world's 24 held-out "
        f"prompts x seeds {report['eval_seeds']} ({report['base']['n_images']} images), "
        f"{report['eval_points']} evaluation points per run; training seeds {report['train_seeds']}.", "",
        "| Method | Steps | Held-out reward | Relative (textured - flat) | Own objective | Fidelity | Textured | "
        "Dark | Saturation | Brightness | Colourfulness | HF energy | Diversity | NFE no-grad | NFE grad | "
        "Train s | Peak MB |",
        "|---|" + "---:|" * 16,
        "| Base model | 0 | " + " | ".join(fmt((base.get(k), None)) for k in METRIC_KEYS)
        + " | 0 | 0 | 0 | - |",
    ]
    for m, agg in report["aggregates"].items():
        lines.append(f"| {LABELS.get(m, m)} | {agg['steps']} | " + " | ".join(fmt(agg[k]) for k in METRIC_KEYS) + " | "
                     + " | ".join(fmt(agg[k], 1) for k in ("nfe_no_grad", "nfe_grad", "train_seconds"))
                     + f" | {fmt(agg['peak_memory_mb'], 0)} |")
    lines += ["", "![held-out reward against NFE](reward_vs_nfe.svg)", "",
              "## Drift warnings (against the base model)", ""]
    base_ind = {k: base.get(k) for k in M.DRIFT_THRESHOLDS}
    any_warning = False
    for m, agg in report["aggregates"].items():
        after = {k: agg[k][0] for k in M.DRIFT_THRESHOLDS if k in agg}
        for w in M.drift_warnings(base_ind, after):
            lines.append(f"- {LABELS.get(m, m)}: {w}")
            any_warning = True
    if not any_warning:
        lines.append("- none")
    lines += [
        "", "## Definitions", "",
        "- Held-out reward: the tiny world's absolute reward s(image, prompt), which every baseline trains on (SRPO "
        "trains on its relative form, Direct-Align on this absolute score).",
        "- Relative: s(\"textured. p\") - s(\"flat. p\"), the SGP-style metric. Own objective: each run's training "
        "reward as summary.json defines it.",
        "- Fidelity: mean of the analytic judge's foreground-colour, background-colour and shape accuracy. Textured / "
        "Dark: share of images judged textured / dark.",
        "- Saturation, brightness, colourfulness, HF energy, diversity: directalign.metrics (hacking indicators).",
        "- NFE: transformer evaluations per sample row summed over the run (expected counts for methods that draw "
        "how many); Train s: the engine's step times; Peak MB: peak RSS of the run's process (CPU) or peak "
        "allocated memory (GPU).",
        "- Values: mean ± sample std over training seeds at the end of each run.",
    ]
    steps_line = ", ".join(f"{LABELS.get(m, m)} {s}" for m, s in report["steps"].items())
    lines += ["", f"Steps per method: {steps_line}."]
    if report.get("calibration"):
        cal = ", ".join(f"{LABELS.get(m, m)} {c['seconds_per_step']:.2f}" for m, c in report["calibration"].items())
        lines += [f"Measured seconds per step: {cal}."]
    return "\n".join(lines) + "\n"


def write_png(series, baseline, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    for label, s in series.items():
        ax.plot([x for x, _ in s], [y for _, y in s], marker="o", label=label)
    if baseline is not None:
        ax.axhline(baseline, color="#555", linestyle="--", label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("model evaluations (NFE, with + without gradient)")
    ax.set_ylabel("held-out reward")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------------------ main
def machine_info() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "python": sys.version.split()[0]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    p.add_argument("--seeds", type=int, default=3, help="training seeds per method (42, 43, ...); default 3")
    p.add_argument("--budget-minutes", type=float, default=42.0,
                   help="wall clock of the whole comparison; sets the steps of each run (default 42)")
    p.add_argument("--steps", action="append", default=[], metavar="METHOD=N",
                   help="fix a method's steps (repeatable; all=N for every method); skips its calibration")
    p.add_argument("--max-steps", type=int, default=0, help="cap on planned steps (default: each config's "
                   "train.steps)")
    p.add_argument("--eval-points", type=int, default=4, help="evaluations per run (the last at its end)")
    p.add_argument("--eval-seeds", default="0,1,2,3", help="noise seeds of the held-out evaluation")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override: a shared key (eval.steps=8) applies to every method, a method section's key "
                        "(grpo.eta=0.5) to the methods it belongs to")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    p.add_argument("--workdir", default="", help="where runs live (default: a temporary directory, removed)")
    p.add_argument("--keep-runs", action="store_true", help="keep run directories, checkpoints and exports")
    p.add_argument("--in-process", action="store_true",
                   help="run everything in this process (faster start; peak memory is then the whole process's)")
    p.add_argument("--plan-only", action="store_true", help="measure, print the plan and the time estimate, stop")
    p.add_argument("--quick", action="store_true",
                   help=f"a 15-minute subset: {', '.join(QUICK_METHODS)}, 1 seed, 2 evaluation points (overrides "
                        "--methods, --seeds, --budget-minutes and --eval-points)")
    p.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.methods, args.seeds, args.budget_minutes, args.eval_points = ",".join(QUICK_METHODS), 1, 15.0, 2
    return args


def main(argv=None, log=print) -> dict | None:
    args = parse_args(argv)
    from directalign.compat import quiet_loading

    quiet_loading()
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        Path(args.result).write_text(json.dumps(WORKERS[args.worker](spec)))
        return None

    t_start = time.time()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if args.seeds < 1 or args.eval_points < 1:
        raise SystemExit("--seeds and --eval-points must be >= 1")
    eval_seeds = [int(s) for s in args.eval_seeds.split(",") if s.strip()]
    fixed = parse_steps(args.steps, methods)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="compare-methods-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log_dir = out / "logs"
    common = {"workdir": str(workdir), "eval_seeds": eval_seeds, "overrides": list(args.set)}
    for m in methods:  # every config must build before anything runs
        run_config(m, 42, 2, workdir / "check", eval_seeds, args.set)

    try:
        log(f"base model: evaluating on {len(eval_seeds) * 24} images")
        t0 = time.time()
        base = call_worker("base", dict(common), args.in_process, log_dir)
        startup = max(0.0, time.time() - t0 - base["eval_seconds"])
        log(f"  held-out reward {base['point']['reward']:.4f}; evaluation {base['eval_seconds']:.1f} s, start-up "
            f"{startup:.1f} s")
        calib = {}
        for m in methods:
            if m not in fixed:
                calib[m] = call_worker("calibrate", dict(common, method=m), args.in_process, log_dir)
                log(f"calibration {LABELS.get(m, m)}: {calib[m]['seconds_per_step']:.2f} s/step")
        runs_n = len(methods) * args.seeds
        n_evals = len(eval_points(10**6, args.eval_points))
        overhead = startup + n_evals * base["eval_seconds"]
        elapsed = time.time() - t_start
        per_run = (args.budget_minutes * 60 - elapsed) / runs_n - overhead
        max_steps = {m: args.max_steps or config_steps(m, args.set) for m in methods}
        if per_run <= 0 and len(fixed) < len(methods):
            raise SystemExit(f"--budget-minutes {args.budget_minutes} leaves no training time: evaluations and "
                             f"start-up take ~{overhead:.0f} s per run x {runs_n} runs; raise the budget or lower "
                             "--seeds / --eval-points / --methods")
        steps = plan_steps(methods, fixed, calib, max(per_run, 0.0), max_steps)
        estimate = None
        if all(m in calib for m in methods):
            estimate = elapsed + sum(args.seeds * (overhead + steps[m] * calib[m]["seconds_per_step"])
                                     for m in methods)
        log("plan: " + ", ".join(f"{LABELS.get(m, m)} {steps[m]} steps" for m in methods) + f"; {args.seeds} seed(s)"
            + (f"; estimated total {estimate / 60:.1f} min" if estimate is not None else ""))
        if args.plan_only:
            return {"steps": steps, "calibration": calib,
                    "estimate_minutes": estimate / 60 if estimate is not None else None}

        runs: dict[str, list[dict]] = {m: [] for m in methods}
        for m in methods:
            for i in range(args.seeds):
                seed = 42 + i
                spec = dict(common, method=m, seed=seed, steps=steps[m], eval_points=args.eval_points,
                            run_dir=str(workdir / f"{m}-seed{seed}"), keep_run=args.keep_runs)
                r = call_worker("run", spec, args.in_process, log_dir)
                runs[m].append(r)
                f = r["points"][-1]
                log(f"{LABELS.get(m, m)} seed {seed}: {steps[m]} steps, reward {f['reward']:.4f}, relative "
                    f"{f['relative']:.4f}, {f['train_seconds']:.0f} s training, {r['wall_seconds']:.0f} s total")
    finally:
        if not args.workdir and not args.keep_runs:
            shutil.rmtree(workdir, ignore_errors=True)

    aggregates = {m: aggregate(runs[m]) for m in methods}
    report = {
        "command": "python benchmarks/compare_methods.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(), "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(t_start)),
        "total_seconds": time.time() - t_start, "budget_minutes": args.budget_minutes,
        "per_run_train_seconds": max(per_run, 0.0), "eval_points": args.eval_points, "eval_seeds": eval_seeds,
        "train_seeds": [42 + i for i in range(args.seeds)], "overrides": list(args.set), "steps": steps,
        "calibration": calib, "base": base, "runs": runs, "aggregates": aggregates,
    }
    (out / "results.json").write_text(json.dumps(clean(report), indent=1))
    (out / "table.md").write_text(markdown(report))
    series = {LABELS.get(m, m): [(c["nfe"], c["reward"]) for c in aggregates[m]["curve"]] for m in methods}
    (out / "reward_vs_nfe.svg").write_text(svg_plot(series, base["point"]["reward"],
                                                    "Held-out reward vs model evaluations (tiny world)",
                                                    "transformer evaluations per sample row, with + without "
                                                    "gradient (NFE, log scale)", "held-out reward (absolute)"))
    png = write_png(series, base["point"]["reward"], out / "reward_vs_nfe.png")
    log(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'reward_vs_nfe.svg'}"
        + (f", {out / 'reward_vs_nfe.png'}" if png else " (matplotlib not installed: no PNG)"))
    return report


if __name__ == "__main__":
    main()
