"""The side-by-side comparison of several evaluated models: one row per model (reward, every metric's mean,
diversity, judge rates), drift warnings against the first model, written as ``compare.json`` and ``compare.csv``."""

from __future__ import annotations

from pathlib import Path

from ..metrics import drift_warnings
from .evaluate import indicator_means
from .output import format_value, write_json, write_table_csv


def unique_labels(labels: list[str]) -> list[str]:
    """``labels`` with repeats numbered: ``a, a, b`` -> ``a, a#2, b``."""
    seen: dict[str, int] = {}
    out = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return out


def compare_table(evals: list[tuple[str, dict]]) -> tuple[list[str], list[list]]:
    """Header and rows (one per model) of the comparison: reward, each metric's mean, diversity and judge rates."""
    cols: list[str] = ["model", "reward"]
    for _, agg in evals:
        cols += [k for k in agg["metrics"] if k not in cols]
    for _, agg in evals:
        cols += [f"diversity.{k}" for k in (agg.get("diversity") or {}) if f"diversity.{k}" not in cols]
    for _, agg in evals:
        cols += [f"judge.{k}" for k in (agg.get("judge") or {}) if f"judge.{k}" not in cols]
    rows = []
    for label, agg in evals:
        row = []
        for c in cols:
            if c == "model":
                row.append(label)
            elif c == "reward":
                row.append(agg.get("reward"))
            elif c.startswith("diversity."):
                row.append((agg.get("diversity") or {}).get(c[len("diversity."):]))
            elif c.startswith("judge."):
                row.append((agg.get("judge") or {}).get(c[len("judge."):]))
            else:
                row.append((agg["metrics"].get(c) or {}).get("mean"))
        rows.append(row)
    return cols, rows


def format_table(cols: list[str], rows: list[list]) -> str:
    """Models as columns, metrics as rows (fits a terminal however many metrics there are)."""
    labels = [str(r[0]) for r in rows]
    width = max(len(c) for c in cols)
    cell = max(10, *(len(lb) for lb in labels))
    lines = [f"{'':{width}s}  " + "  ".join(f"{lb:>{cell}s}" for lb in labels)]
    for j, c in enumerate(cols[1:], 1):
        lines.append(f"{c:{width}s}  " + "  ".join(f"{format_value(r[j]):>{cell}s}" for r in rows))
    return "\n".join(lines)


def comparison_warnings(evals: list[tuple[str, dict]]) -> dict[str, list[str]]:
    """``{label: drift warnings}`` of every model against the first (the reference)."""
    ref_means = indicator_means(evals[0][1])
    return {label: drift_warnings(ref_means, indicator_means(agg)) for label, agg in evals[1:]}


def write_comparison(evals: list[tuple[str, dict]], out: Path) -> tuple[list[str], list[list], dict]:
    """``compare.json`` (table, every aggregate, warnings) and ``compare.csv`` in ``out``; returns the table's
    columns, rows and the warnings."""
    cols, rows = compare_table(evals)
    warnings = comparison_warnings(evals)
    write_json(out / "compare.json", {"columns": cols, "rows": rows, "models": {lb: a for lb, a in evals},
                                      "reference": evals[0][0], "warnings": warnings})
    write_table_csv(out / "compare.csv", cols, rows)
    return cols, rows, warnings
