"""The reading of a long method comparison (``benchmarks/compare_long.py``): plateau rule, seed-mean curves, the compute
each method needs to reach SRPO's final level, whether its own objective rose beyond its seed spread, the merge of
per-method chunks, and the table and plots. Everything here is pure (no torch, no training) except the file writers.

Curves. A run's curve is one of its held-out metrics (``CURVE_METRICS``: rewards, fidelity and the drift
indicators) against x (NFE = transformer evaluations per sample row with + without
gradient, or the engine's training seconds), starting at the base model (x = 0). A method's seed-mean curve is
evaluated on the union of its seeds' x values: each seed's curve linearly interpolated there and, past its last
evaluation, held at its last value (by the stop rule a run stops at a plateau or at the cap), then averaged.

Reach. SRPO's result is the point of its seed-mean NFE curves with the highest relative metric among those whose
fidelity stays at or above the base model's (the fidelity floor; time_to_quality's rule): past that point SRPO buys
texture with fidelity, so its last point is not a result worth reaching. When no evaluated point keeps the floor, the
last point is the result (and the table says so). SRPO's level on each metric is its value at the result. A method
reaches it at the first x where its seed-mean curve is >= that level, linearly interpolated between the two
points around the crossing (x = 0 when the base model is already there; None = never within the run). The ratio is
that x over SRPO's own first crossing of the same level on its own seed-mean curve (None when either is None or
SRPO's is 0: a level the base already meets gives no compute ratio). This is the measurement of the SRPO paper's
compute claim (arXiv 2509.06942, Sec. 5 / Fig. 1: SRPO against DanceGRPO in GPU hours) made in NFE and seconds.
The same is read at ``NEAR_FRACTION`` (0.95) of SRPO's relative gain over the base model, so a method that levels
off just under SRPO's result still gets a ratio (``relative_near``).

Own objective. For each method: base = its own objective (its training reward's held-out form) on the base model;
final_s = its own objective at seed s's last evaluation; rise = mean_s(final_s) - base; spread = the sample standard
deviation (n - 1) of final_s over seeds; it "rose beyond its seed spread" when rise > 2 x spread (undecided with one
seed).
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_methods import LABELS, METRIC_KEYS, clean, fmt, mean_std

from directalign.errors import UserError
from directalign.report_plots import svg_plot

REACH_METRICS = ("relative", "fidelity")
NEAR_FRACTION = 0.95  # "near SRPO's result": this share of its relative gain over the base (as time_to_quality)
AXES = {"nfe": "NFE", "seconds": "train s"}
CURVE_METRICS = {"reward": "held-out reward (absolute)", "relative": "relative (textured - flat)",
                 "fidelity": "fidelity (analytic judge)",
                 # the drift indicators (directalign.metrics.DRIFT_THRESHOLDS) and the tiny world's known hack
                 "dark_share": "dark share (analytic judge)", "brightness": "brightness", "saturation": "saturation",
                 "colourfulness": "colourfulness", "hf_energy": "high-frequency energy",
                 "diversity_pixel": "pixel diversity within a prompt"}
SHARED_BASE_KEYS = ("reward", "relative", "fidelity")  # what every method's base evaluation must agree on
BASE_TOLERANCE = 1e-5
NFE_LABEL = "transformer evaluations per sample row, with + without gradient (NFE, log scale)"


class CompareError(UserError):
    """A comparison's inputs do not fit together (e.g. chunks evaluated on different seeds); one line says which."""


# ------------------------------------------------------------------------------------------------ stop rule
def plateaued(values: list[float], delta: float, patience: int) -> bool:
    """True when the last ``patience`` values each failed to beat the best so far by more than ``delta``.

    ``values[0]`` is the base model's value (the first best); the best only moves on an improvement > ``delta``
    (as Keras' EarlyStopping with ``min_delta``)."""
    best, stale = values[0], 0
    for v in values[1:]:
        if v > best + delta:
            best, stale = v, 0
        else:
            stale += 1
    return stale >= patience


def stop_reason(own: list[float], train_seconds: float, step: int, delta: float, patience: int,
                cap_seconds: float, max_steps: int = 0, min_seconds: float = 0.0) -> str | None:
    """Why a run stops after its latest evaluation: "plateau" (checked first; only once the run has trained
    ``min_seconds``, so a slow starter is not stopped before it moves), "cap" (training seconds >= ``cap_seconds`` or
    step >= ``max_steps`` when that is > 0), or None to go on. ``own``: its own objective at the base model then at
    every evaluation so far."""
    if train_seconds >= min_seconds and plateaued(own, delta, patience):
        return "plateau"
    if train_seconds >= cap_seconds or (max_steps > 0 and step >= max_steps):
        return "cap"
    return None


# ---------------------------------------------------------------------------------------------------- curves
def interp(curve: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear value of ``curve`` (sorted by x) at ``x``; its first / last value outside its range."""
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(curve):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return curve[-1][1]


def mean_curve(curves: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """Seed-mean of curves on the union of their x values (each held at its last value past its end)."""
    xs = sorted({x for c in curves for x, _ in c})
    return [(x, statistics.fmean(interp(c, x) for c in curves)) for x in xs]


def first_reach(curve: list[tuple[float, float]], level: float) -> float | None:
    """The first x at which ``curve`` is >= ``level``, interpolated between the points around the crossing."""
    x0, y0 = curve[0]
    if y0 >= level:
        return x0
    for x1, y1 in curve[1:]:
        if y1 >= level:
            return x0 + (level - y0) / (y1 - y0) * (x1 - x0)
        x0, y0 = x1, y1
    return None


def x_of(point: dict, axis: str) -> float:
    return point["nfe_no_grad"] + point["nfe_grad"] if axis == "nfe" else point["train_seconds"]


def run_curve(base: dict, run: dict, metric: str, axis: str) -> list[tuple[float, float]]:
    return [(0.0, base[metric])] + [(x_of(p, axis), p[metric]) for p in run["points"]]


def method_curve(entry: dict, metric: str, axis: str) -> list[tuple[float, float]]:
    """The seed-mean curve of one method (``entry``: its base point and runs) on ``axis``."""
    return mean_curve([run_curve(entry["base"], r, metric, axis) for r in entry["runs"]])


def result_point(relative: list[tuple[float, float]], fidelity: list[tuple[float, float]],
                 floor: float) -> tuple[int, bool]:
    """The index of the best ``relative`` value among the points (after the base, x > 0) whose ``fidelity`` is
    >= ``floor``, and True; or the last index and False when no such point exists. Both curves share their x."""
    kept = [i for i in range(1, len(relative)) if fidelity[i][1] >= floor]
    if not kept:
        return len(relative) - 1, False
    return max(kept, key=lambda i: relative[i][1]), True


def reach(curves: dict[str, list[tuple[float, float]]], ref: str = "srpo",
          level: float | None = None) -> dict[str, dict]:
    """Per method: the x where its curve first reaches ``level`` (default: ``ref``'s final value), and its ratio to
    ``ref``'s own first crossing of it."""
    if ref not in curves:
        return {}
    level = curves[ref][-1][1] if level is None else level
    ref_x = first_reach(curves[ref], level)
    out = {}
    for m, c in curves.items():
        x = first_reach(c, level)
        ratio = x / ref_x if x is not None and ref_x else None
        out[m] = {"level": level, "x": x, "ref_x": ref_x, "ratio": ratio}
    return out


def objective_rise(base_own: float, finals: list[float]) -> dict:
    """rise = mean(finals) - base; spread = sample std of finals; rose = rise > 2 x spread (None with one seed)."""
    rise = statistics.fmean(finals) - base_own
    spread = statistics.stdev(finals) if len(finals) > 1 else None
    return {"base": base_own, "final_mean": statistics.fmean(finals), "rise": rise, "spread": spread,
            "rose": None if spread is None else rise > 2 * spread}


def analyse(report: dict) -> dict:
    """Finals, curves, reach and own-objective rise of every method in ``report["methods"]``."""
    from directalign import metrics as M

    methods = report["methods"]
    out: dict = {"curves": {}, "finals": {}, "reach": {}, "objective": {}, "drift": {}, "stops": {}}
    for m, e in methods.items():
        finals = [r["points"][-1] for r in e["runs"]]
        agg = {k: mean_std([f.get(k) for f in finals]) for k in METRIC_KEYS + ("nfe_no_grad", "nfe_grad",
                                                                                "train_seconds", "step")}
        agg["peak_memory_mb"] = mean_std([r.get("peak_memory_mb") for r in e["runs"]])
        out["finals"][m] = agg
        out["curves"][m] = {f"{k}/{a}": method_curve(e, k, a) for k in CURVE_METRICS for a in AXES}
        out["objective"][m] = objective_rise(e["base"]["own_objective"], [f["own_objective"] for f in finals])
        before = {k: e["base"].get(k) for k in M.DRIFT_THRESHOLDS}
        out["drift"][m] = M.drift_warnings(before, {k: agg[k][0] for k in M.DRIFT_THRESHOLDS if k in agg})
        out["stops"][m] = [r["stop_reason"] for r in e["runs"]]
    levels: dict[str, float | None] = {k: None for k in REACH_METRICS}
    if "srpo" in methods:
        c = out["curves"]["srpo"]
        floor = methods["srpo"]["base"]["fidelity"]
        i, kept = result_point(c["relative/nfe"], c["fidelity/nfe"], floor)
        levels = {k: c[f"{k}/nfe"][i][1] for k in REACH_METRICS}
        out["srpo_result"] = {"nfe": c["relative/nfe"][i][0], "fidelity_floor": floor, "kept_fidelity": kept,
                              **levels}
    for k in REACH_METRICS:
        for a in AXES:
            out["reach"][f"{k}/{a}"] = reach({m: c[f"{k}/{a}"] for m, c in out["curves"].items()}, level=levels[k])
    if "srpo" in methods:  # a level that a method levelling off just under SRPO's result still crosses
        base_rel = methods["srpo"]["base"]["relative"]
        near = base_rel + NEAR_FRACTION * (levels["relative"] - base_rel)
        for a in AXES:
            out["reach"][f"relative_near/{a}"] = reach({m: c[f"relative/{a}"] for m, c in out["curves"].items()},
                                                       level=near)
    return out


# ----------------------------------------------------------------------------------------------------- merge
def merge(reports: list[dict], names: list[str]) -> dict:
    """One report from per-method chunks: same evaluation seeds and base point (reward, relative, fidelity within
    ``BASE_TOLERANCE``) required, each method in one chunk only."""
    if not reports:
        raise CompareError("--merge: give at least one output directory of benchmarks/compare_long.py")
    first, methods = reports[0], {}
    for rep, name in zip(reports, names):
        if rep.get("kind") != "compare_long":
            raise CompareError(f"--merge: {name}/results.json is not an output of benchmarks/compare_long.py")
        if rep["eval_seeds"] != first["eval_seeds"]:
            raise CompareError(f"--merge: {name} used eval seeds {rep['eval_seeds']}, {names[0]} "
                               f"{first['eval_seeds']}; rerun it with --eval-seeds {','.join(map(str, first['eval_seeds']))}")
        for k in SHARED_BASE_KEYS:
            a, b = rep["base"][k], first["base"][k]
            if a is None or b is None or abs(a - b) > BASE_TOLERANCE:
                raise CompareError(f"--merge: {name}'s base model has {k} {a} but {names[0]}'s {b}: the chunks "
                                   "evaluated different models or settings; rerun them with the same --set options")
        for m, e in rep["methods"].items():
            if m in methods:
                raise CompareError(f"--merge: method {m!r} is in more than one chunk ({name}); merge each once")
            methods[m] = e
    return dict(first, methods=methods, merged_from=list(names), commands=[r["command"] for r in reports],
                total_seconds=sum(r["total_seconds"] for r in reports))


def read_report(directory: Path) -> dict:
    path = Path(directory) / "results.json"
    if not path.is_file():
        raise CompareError(f"--merge: {path} does not exist; give output directories of benchmarks/compare_long.py")
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------- reporting
def _num(x, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(report: dict, a: dict) -> str:
    s, mach = report["settings"], report["machine"]
    commands = report.get("commands") or [report["command"]]
    lines = ["# Long method comparison on the tiny world (until plateau or cap)", "",
             "Commands: " + "; ".join(f"`{c}`" for c in commands), "",
             (f"Machine: {mach['platform']}, {mach['cpus']} CPUs, torch {mach['torch']} ({mach['threads']} "
              f"threads), device {mach['device']}. Started {report['started']}, "
              f"{report['total_seconds'] / 60:.1f} min in all."), "",
             f"Each (method, seed) run trains in sessions of ~{s['eval_every_seconds']:g} s of training, evaluates on "
             f"the 24 held-out prompts x seeds {report['eval_seeds']} after each, and stops when its own objective has "
             f"not beaten its best so far by more than {s['plateau_delta']:g} for {s['plateau_patience']} evaluations "
             f"in a row after at least {s.get('min_minutes', 0):g} min of training (plateau) or at "
             f"{s['cap_minutes']:g} min of training" +
             (f" or step {s['max_steps']}" if s.get("max_steps") else "") + " (cap)."
             + ("" if all(e.get("settings", s) == s for e in report["methods"].values()) else
                " Some merged chunks used other settings: see each method's settings in results.json."), "",
             ("| Method | Stops | Steps | Held-out reward | Relative | Own objective | Fidelity | Textured | Dark | "
              "Saturation | Brightness | Colourfulness | HF energy | Diversity | NFE no-grad | NFE grad | Train s | "
              "Peak MB |"), "|---|---|" + "---:|" * 16]
    base = report["base"]
    lines.append("| Base model | - | 0 | " + " | ".join(fmt((base.get(k), None)) for k in METRIC_KEYS)
                 + " | 0 | 0 | 0 | - |")
    for m, f in a["finals"].items():
        stops = "/".join(a["stops"][m])
        lines.append(f"| {LABELS.get(m, m)} | {stops} | {fmt(f['step'], 0)} | " + " | ".join(fmt(f[k]) for k in
                     METRIC_KEYS) + " | " + " | ".join(fmt(f[k], 1) for k in ("nfe_no_grad", "nfe_grad",
                                                                              "train_seconds"))
                     + f" | {fmt(f['peak_memory_mb'], 0)} |")
    lines += ["", "Values: mean ± sample std over training seeds at each run's last evaluation.", "",
              "## Compute to reach SRPO's level", ""]
    if "srpo" not in report["methods"]:
        lines.append("SRPO is not in this comparison: no reference level.")
    else:
        res = a["srpo_result"]
        where = ("its best relative value among the points whose fidelity stayed at or above the base model's "
                 f"{res['fidelity_floor']:.4f}" if res["kept_fidelity"] else
                 f"its last point (no point kept the base model's fidelity {res['fidelity_floor']:.4f})")
        lines += [(f"SRPO's result ({where}, at {res['nfe']:,.0f} NFE on its seed-mean curve): relative "
                  f"{res['relative']:+.4f}, fidelity {res['fidelity']:.4f}. Each cell: the NFE (with + without "
                  "gradient) or training seconds at which the method's seed-mean curve first reaches it "
                  "(interpolated between evaluations; 0: the base model is already there; -: never within the run), "
                  "and in brackets its ratio to SRPO's own first crossing of that level."), "",
                  (f"The last two columns: the first crossing of {NEAR_FRACTION:.0%} of SRPO's relative gain over the "
                   f"base model (relative {a['reach']['relative_near/nfe']['srpo']['level']:+.4f}), which a method "
                   "that levels off just under SRPO's result still crosses."), "",
                  ("| Method | Relative: NFE (x SRPO) | Relative: train s (x SRPO) | Fidelity: NFE (x SRPO) | "
                   f"Fidelity: train s (x SRPO) | {NEAR_FRACTION:.0%} of the relative gain: NFE (x SRPO) | "
                   f"{NEAR_FRACTION:.0%}: train s (x SRPO) |"), "|---|---:|---:|---:|---:|---:|---:|"]
        for m in report["methods"]:
            cells = []
            for key in ("relative/nfe", "relative/seconds", "fidelity/nfe", "fidelity/seconds", "relative_near/nfe",
                        "relative_near/seconds"):
                r = a["reach"][key][m]
                cells.append(_num(r["x"], 0 if key.endswith("nfe") else 1)
                             + ("" if r["ratio"] is None else f" ({r['ratio']:.2f}x)"))
            lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    lines += ["", "## Own objective: did it rise beyond the seed spread?", "",
              ("rise = mean over seeds of the own objective at the last evaluation - its value on the base model; "
               "spread = sample std over seeds of that last value; yes when rise > 2 x spread."), "",
              "| Method | Base | Final (mean) | Rise | 2 x spread | Rose beyond spread |", "|---|---:|---:|---:|---:|---|"]
    for m, o in a["objective"].items():
        verdict = "one seed: undecided" if o["rose"] is None else ("yes" if o["rose"] else "no")
        two = "-" if o["spread"] is None else f"{2 * o['spread']:.4f}"
        lines.append(f"| {LABELS.get(m, m)} | {o['base']:.4f} | {o['final_mean']:.4f} | {o['rise']:+.4f} | "
                     f"{two} | {verdict} |")
    lines += ["", "## Drift warnings (seed-mean final against the base model)", ""]
    warned = [f"- {LABELS.get(m, m)}: {w}" for m, ws in a["drift"].items() for w in ws]
    lines += warned or ["- none"]
    lines += ["", "## Curves", ""] + [f"![{CURVE_METRICS[k]} against {AXES[x]}]({k}_vs_{x}.svg)"
                                      for k in CURVE_METRICS for x in AXES]
    return "\n".join(lines) + "\n"


def write_outputs(report: dict, out: Path) -> dict:
    """results.json (the report and its analysis), table.md and one SVG per curve metric and axis."""
    out.mkdir(parents=True, exist_ok=True)
    a = analyse(report)
    (out / "results.json").write_text(json.dumps(clean(dict(report, analysis=a)), indent=1))
    (out / "table.md").write_text(markdown(report, a))
    for k, ylabel in CURVE_METRICS.items():
        for x, xlabel in (("nfe", NFE_LABEL), ("seconds", "training seconds (log scale)")):
            series = {LABELS.get(m, m): c[f"{k}/{x}"] for m, c in a["curves"].items()}
            (out / f"{k}_vs_{x}.svg").write_text(svg_plot(series, report["base"][k], f"{ylabel} (tiny world, "
                                                          "seed mean)", xlabel, ylabel))
    return a
