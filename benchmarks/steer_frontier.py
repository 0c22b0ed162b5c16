"""Fine-tune, steer, or both: reward against NFE for every steering method on the tiny world's held-out prompts, on
the base model and on the SRPO-tuned default run, with the fidelity judge and the drift indicators; the equal-NFE
comparison with best-of-N; and the frontier of held-out reward against compute per image once the training NFE is
amortised over a stated number of images.

    python benchmarks/steer_frontier.py                          # trains the default run first if --run is absent
    python benchmarks/steer_frontier.py --run runs/srpo-tiny     # the main job's run (README Quickstart)
    python benchmarks/steer_frontier.py --quick                  # 2 noise seeds and the smaller budgets

Budgets are multiples of plain sampling (``eval.steps`` model calls per image): best-of-N with N = 1, 2, 4, 8;
noise search (N + rounds x neighbours = 4 and 8); FK with 2, 4 and 8 particles (lambda 10, max potential, the
reference's resampling grid); ReNO and DNO with 1, 3 and 7 optimisation steps (2x, 4x and 8x the calls, half of them
under autograd) at their published defaults. Every method steers by the run's own training reward (the held-out
``reward`` of ``summary.json``) and is scored by that same reward, so the reward column can be gamed: the judge's
fidelity (mean rate of correct foreground colour, background colour and shape), the textured / dark shares and the
image indicators are the checks against hacking.

Frontier: for M generated images, "fine-tune" costs train_NFE / M + the sampling NFE per image; "steer" costs the
steering NFE per image; "both" costs train_NFE / M + the steering NFE on the tuned model. NFE counts model calls with
and without gradient alike (a call under autograd costs about 3x on this machine: see the seconds columns).

Outputs under ``--out`` (default ``benchmarks/results/steer_frontier``): ``results.json``, ``table.md`` (the command,
machine, tables and the frontier), ``frontier.svg`` and ``reward_vs_nfe_base.svg`` / ``_tuned.svg``; and ``RUN/steer_frontier.json``, so
``directalign report RUN`` shows the frontier.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_methods import machine_info  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "steer_frontier"
AMORTISE = (100, 1000, 10000)

# (method, options, budget as a multiple of plain sampling's NFE)
GRID = [
    ("best-of-n", {"n": 1}), ("best-of-n", {"n": 2}), ("best-of-n", {"n": 4}), ("best-of-n", {"n": 8}),
    ("noise-search", {"n": 2, "rounds": 1, "neighbors": 2}), ("noise-search", {"n": 4, "rounds": 1, "neighbors": 4}),
    ("fk", {"n": 2}), ("fk", {"n": 4}), ("fk", {"n": 8}),
    ("reno", {"iterations": 1}), ("reno", {"iterations": 3}), ("reno", {"iterations": 7}),
    ("dno", {"iterations": 1}), ("dno", {"iterations": 3}), ("dno", {"iterations": 7}),
]
QUICK = {("best-of-n", 8), ("fk", 8), ("reno", 7), ("dno", 7)}  # dropped by --quick: (method, largest size)


def _size(opts: dict) -> int:
    return opts.get("n", opts.get("iterations", 0))


def ensure_run(run: str | None, log) -> Path:
    """The SRPO-tuned default run: ``run`` when given, else the main job trained into a temporary directory."""
    import tempfile

    import directalign as da

    if run:
        path = Path(run)
        if not (path / "summary.json").is_file():
            raise SystemExit(f"--run {run!r} has no summary.json; give a finished run (directalign train --config "
                             "tiny-srpo)")
        return path
    path = Path(tempfile.mkdtemp(prefix="steer-frontier-")) / "srpo-tiny"
    log(f"training the default run (tiny-srpo) into {path}")
    da.train(da.load_config("tiny-srpo", overrides=[f"run.output_dir={path}", "run.progress=false"]),
             overwrite=True, log=lambda *_: None)
    return path


def training_cost(run: Path) -> dict:
    """NFE (with and without gradient), optimizer steps and step seconds of the run's training, from metrics.jsonl."""
    nfe = grad = seconds = 0.0
    steps = 0
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        nfe += rec.get("nfe_no_grad", 0) + rec.get("nfe_grad", 0)
        grad += rec.get("nfe_grad", 0)
        seconds += rec.get("step_seconds", 0.0)
        steps = max(steps, rec.get("step", 0))
    return {"nfe": nfe, "nfe_grad": grad, "seconds": round(seconds, 1), "steps": steps}


def measure(label, ref, cfg, adapter, reward_model, prompts, seeds, method, opts, log) -> dict:
    """Steer every slot, then evaluate the images: the training reward (mean and 95% interval), judge rates and
    image indicators."""
    from directalign.eval.evaluate import evaluate_model
    from directalign.steer import SteerSettings
    from directalign.steer.run import build_options, reward_function, steer_with

    score_fn = reward_function("train", cfg, True)
    settings = SteerSettings.from_config(cfg, build_options(method, opts))
    res = steer_with(method, adapter, score_fn, "train", prompts, seeds, settings, False, label)
    records = [{"prompt": p, "seed": s} for p, s in zip(prompts, seeds)]
    ev = evaluate_model(ref, cfg, True, [], images=res.images, records=records, train_model=reward_model,
                        log=lambda *_: None)
    agg = ev.aggregate
    judge = agg["judge"] or {}
    fid = [judge[k] for k in ("fg", "bg", "shape") if k in judge]
    n = len(prompts)
    row = {"model": label, "method": method, "options": opts, "nfe_per_image": (res.nfe_no_grad + res.nfe_grad) / n,
           "nfe_grad_per_image": res.nfe_grad / n, "reward_calls_per_image": res.reward_calls / n,
           "seconds_per_image": res.seconds / n, "reward": agg["reward"],
           "reward_ci": [agg["metrics"]["train_reward"]["ci95_low"], agg["metrics"]["train_reward"]["ci95_high"]],
           "fidelity": sum(fid) / len(fid) if fid else None, "textured_share": judge.get("textured_share"),
           "dark_share": judge.get("dark_share"),
           "indicators": {k: agg["metrics"][k]["mean"] for k in ("saturation", "brightness", "colourfulness",
                                                                 "hf_energy")}}
    log(f"{label:>5} {method:<13} {json.dumps(opts):<40} NFE/img {row['nfe_per_image']:6.0f} "
        f"reward {row['reward']:+.4f} fidelity {row['fidelity']:.3f} {row['seconds_per_image']:.3f} s/img")
    return row


def frontier(rows: list[dict], train: dict, m: int) -> list[dict]:
    """Every (model, method, budget) point with its compute per image when training is amortised over ``m``
    images; the Pareto-optimal ones flagged."""
    pts = []
    for r in rows:
        tuned = r["model"] == "tuned"
        kind = ("fine-tune" if r["method"] == "best-of-n" and r["options"] == {"n": 1} else "both") if tuned else \
            ("base" if r["method"] == "best-of-n" and r["options"] == {"n": 1} else "steer")
        cost = r["nfe_per_image"] + (train["nfe"] / m if tuned else 0.0)
        pts.append({"kind": kind, "model": r["model"], "method": r["method"], "options": r["options"],
                    "nfe_per_image": cost, "reward": r["reward"], "fidelity": r["fidelity"]})
    for p in pts:
        p["pareto"] = not any(q["nfe_per_image"] <= p["nfe_per_image"] and q["reward"] > p["reward"] for q in pts)
    return pts


def _fmt(v, digits=4):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def markdown(report: dict) -> str:
    lines = ["# Steering on the tiny world: fine-tune, steer, or both\n",
             f"Command: `{report['command']}`  ", f"Machine: {json.dumps(report['machine'])}  ",
             f"Held-out prompts: {report['n_prompts']} x seeds {report['seeds']} = {report['n_images']} images, "
             f"{report['steps']} sampling steps; steering reward = scoring reward = the run's training reward.  ",
             f"Training (SRPO default run): {report['train']['nfe']:.0f} NFE ({report['train']['nfe_grad']:.0f} with "
             f"gradient), {_fmt(report['train']['seconds'], 1)} s.\n",
             "| model | method | options | NFE / image | (with grad) | s / image | reward (95% CI) | fidelity | "
             "textured | dark | saturation | hf energy |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        ci = r["reward_ci"]
        ci_s = f" [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci and None not in ci else ""
        lines.append(f"| {r['model']} | {r['method']} | `{json.dumps(r['options'])}` | {r['nfe_per_image']:.0f} | "
                     f"{r['nfe_grad_per_image']:.0f} | {r['seconds_per_image']:.3f} | {r['reward']:+.4f}{ci_s} | "
                     f"{_fmt(r['fidelity'], 3)} | {_fmt(r['textured_share'], 3)} | {_fmt(r['dark_share'], 3)} | "
                     f"{r['indicators']['saturation']:.3f} | {r['indicators']['hf_energy']:.4f} |")
    lines.append("\n## Equal NFE against best-of-N (same model, same budget)\n")
    lines.append("| model | NFE / image | best-of-N | " + " | ".join(report["equal_nfe_methods"]) + " |")
    lines.append("|---|---|---|" + "---|" * len(report["equal_nfe_methods"]))
    for e in report["equal_nfe"]:
        cells = [_fmt(e["methods"].get(m), 4) for m in report["equal_nfe_methods"]]
        lines.append(f"| {e['model']} | {e['nfe']:.0f} | {_fmt(e['best_of_n'], 4)} | " + " | ".join(cells) + " |")
    for m, pts in report["frontier"].items():
        lines.append(f"\n## Frontier, training amortised over {m} images (Pareto-optimal points)\n")
        lines.append("| kind | model | method | options | NFE / image | reward | fidelity |")
        lines.append("|---|---|---|---|---|---|---|")
        for p in sorted((p for p in pts if p["pareto"]), key=lambda p: p["nfe_per_image"]):
            lines.append(f"| {p['kind']} | {p['model']} | {p['method']} | `{json.dumps(p['options'])}` | "
                         f"{p['nfe_per_image']:.1f} | {p['reward']:+.4f} | {_fmt(p['fidelity'], 3)} |")
    return "\n".join(lines) + "\n"


def equal_nfe(rows: list[dict]) -> tuple[list[dict], list[str]]:
    methods = sorted({r["method"] for r in rows} - {"best-of-n"})
    out = []
    for model in ("base", "tuned"):
        mine = [r for r in rows if r["model"] == model]
        for nfe in sorted({r["nfe_per_image"] for r in mine if r["method"] == "best-of-n"}):
            bon = next(r["reward"] for r in mine if r["method"] == "best-of-n" and r["nfe_per_image"] == nfe)
            cells = {m: next((r["reward"] for r in mine if r["method"] == m and r["nfe_per_image"] == nfe), None)
                     for m in methods}
            out.append({"model": model, "nfe": nfe, "best_of_n": bon, "methods": cells})
    return out, methods


def replot(out: Path) -> None:
    """Rewrite the plots from ``out/results.json`` (after a change of the plotting only)."""
    from directalign.report_steer import frontier_svg, reward_vs_nfe_svg

    report = json.loads((out / "results.json").read_text())
    (out / "frontier.svg").write_text(frontier_svg(report, 1000))
    for model in ("base", "tuned"):
        (out / f"reward_vs_nfe_{model}.svg").write_text(reward_vs_nfe_svg(report, model))


def main(argv=None, log=print) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", help="the SRPO-tuned run (default: train tiny-srpo into OUT/run)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="noise seeds (default 0 1 2 3)")
    p.add_argument("--quick", action="store_true", help="the first 2 noise seeds, drop the largest budgets")
    p.add_argument("--methods", default="", help="comma-separated subset of the steering methods (default: all)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--replot", action="store_true", help="only rewrite the plots from OUT/results.json")
    args = p.parse_args(argv)
    if args.replot:
        replot(Path(args.out))
        return json.loads((Path(args.out) / "results.json").read_text())
    import torch

    from directalign.compat import quiet_loading
    from directalign.eval.heldout import eval_slots
    from directalign.eval.models import load_model, resolve_model
    from directalign.eval.scoring import training_reward_model
    from directalign.eval.settings import settings_config
    from directalign.prompts import load_prompts
    from directalign.report_steer import FRONTIER_FILE

    quiet_loading()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seeds = args.seeds[:2] if args.quick else args.seeds
    keep = {m.strip() for m in args.methods.split(",") if m.strip()} or {m for m, _ in GRID}
    grid = [(m, o) for m, o in GRID if m in keep and not (args.quick and (m, _size(o)) in QUICK)]
    machine = machine_info()
    log(f"{machine['cpus']} CPU cores, {torch.get_num_threads()} torch threads")
    run = ensure_run(args.run, log)
    t0 = time.time()
    refs = {"base": resolve_model("base", None), "tuned": resolve_model(str(run))}
    cfg, _ = settings_config(None, [refs["tuned"]], {"eval.seeds": seeds, "run.progress": False})
    refs["base"] = resolve_model("base", cfg)
    prompts = load_prompts(cfg.eval.prompts)
    slot_prompts, slot_seeds = eval_slots(prompts, seeds)
    reward_model = training_reward_model(cfg)
    rows = []
    for label in ("base", "tuned"):
        adapter = load_model(refs[label], cfg)
        for method, opts in grid:
            rows.append(measure(label, refs[label], cfg, adapter, reward_model, slot_prompts, slot_seeds, method,
                                opts, log))
        del adapter
    train = training_cost(run)
    eq, eq_methods = equal_nfe(rows)
    report = {"command": "python benchmarks/steer_frontier.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine, "seconds": round(time.time() - t0, 1), "run": str(run), "seeds": seeds,
              "n_prompts": len(prompts), "n_images": len(slot_prompts), "steps": cfg.eval.steps, "train": train,
              "rows": rows, "equal_nfe": eq, "equal_nfe_methods": eq_methods,
              "frontier": {m: frontier(rows, train, m) for m in AMORTISE}}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "table.md").write_text(markdown(report))
    replot(out)
    (run / FRONTIER_FILE).write_text(json.dumps(report, indent=1) + "\n")
    log(f"wrote {out / 'table.md'}, results.json, frontier.svg, reward_vs_nfe_*.svg ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
