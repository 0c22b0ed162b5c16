"""One model's full evaluation: generate with fixed seeds (or take a folder's images), score with every reward,
the image indicators, diversity and the tiny world's judge rates, per image and aggregated with 95% intervals; and
the differences from a baseline with drift warnings.

With a config that defines a training reward, ``reward`` of the aggregate is that reward computed by
:func:`directalign.eval.heldout.evaluate`, the number ``summary.json`` reports: ``directalign eval --model RUN``
reproduces ``reward_after`` and ``directalign eval --model base --config RUN/config.yaml`` reproduces
``reward_before``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from .. import metrics as M
from ..progress import bar
from .heldout import (
    eval_slots,
    evaluate,
    generate_slots,
    sampling_steps,
    score_in_chunks,
)
from .models import ModelRef, load_model, resolve_model
from .output import format_value, write_json, write_records_csv
from .scoring import RewardSpec, score_images, training_reward_model
from .stats import mean_ci
from .video import frame_strips, score_videos, video_columns


@dataclass
class ModelEval:
    label: str
    aggregate: dict
    per_image: list[dict] = field(default_factory=list)
    images: object = None  # (N, 3, H, W) tensor


def _judge_applicable(prompts: list[str]) -> bool:
    from ..world.dataset import parse_caption

    return all(parse_caption(p) for p in prompts)


def evaluate_model(ref: ModelRef | None, cfg, trained: bool, rewards: list[RewardSpec], *, images=None,
                   records=None, train_model=None, log=print) -> ModelEval:
    """Generate (or take ``images`` with their manifest ``records``), score with every reward, compute indicators
    and judge rates; progress bars (generation, scoring) unless ``cfg.run.progress`` is false."""
    from ..prompts import load_prompts

    train_rewards = None
    judge = None
    if trained and train_model is None:
        train_model = training_reward_model(cfg)
    if images is None:
        prompts = load_prompts(cfg.eval.prompts)
        adapter = load_model(ref, cfg)
        log(f"{ref.label}: generating {len(prompts) * len(cfg.eval.seeds)} images "
            f"({len(prompts)} prompts x {len(cfg.eval.seeds)} seeds, {cfg.eval.steps} steps)")
        if trained:
            result = evaluate(adapter, train_model, cfg, prompts, ref.is_world, desc=f"{ref.label}: generating")
            images, slot_prompts, slot_seeds = result.images, result.prompts, result.seeds
            train_rewards, judge = result.rewards, result.judge
        else:
            slot_prompts, slot_seeds = eval_slots(prompts, cfg.eval.seeds)
            with bar(sampling_steps(len(slot_prompts), cfg), f"{ref.label}: generating", cfg.run.progress,
                     unit="step", postfix=f"{len(slot_prompts)} images") as b:
                images = generate_slots(adapter, slot_prompts, slot_seeds, cfg, b)
        del adapter
    else:
        slot_prompts = [r["prompt"] for r in records]
        slot_seeds = [r.get("seed") for r in records]
        if trained:
            with bar(len(slot_prompts), "training reward", cfg.run.progress, unit="img") as b:
                train_rewards = score_in_chunks(train_model, images, slot_prompts, cfg, progress=b)
    videos = images if images.ndim == 5 else None  # (N, F, 3, H, W): scored per frame, measured as frame strips
    if videos is not None:
        images = frame_strips(videos)
    if judge is None and _judge_applicable(slot_prompts) and images.shape[-1] == 32 and images.shape[-2] == 32:
        from ..world.judge import attribute_rates

        judge = attribute_rates(images, slot_prompts)

    n = len(slot_prompts)
    per_image: list[dict] = [{"index": i, "prompt": slot_prompts[i], "seed": slot_seeds[i]} for i in range(n)]
    columns: dict[str, list] = {}
    if train_rewards is not None:
        columns["train_reward"] = train_rewards.tolist()
    if videos is not None:
        columns.update(video_columns(videos))
    diversity: dict = {"pixel": M.diversity(images, slot_prompts)}
    with bar(len(rewards) * n, "scoring", cfg.run.progress and bool(rewards), unit="img") as b:
        for spec in rewards:
            b.set_postfix_str(spec.name)
            s = score_images(spec, images, slot_prompts) if videos is None else score_videos(spec, videos, slot_prompts)
            columns[f"{spec.name}.score"] = s["score"].tolist()
            columns[f"{spec.name}.relative"] = s["relative"].tolist()
            if s["embedding"].shape[1]:
                diversity[f"{spec.name}.embedding"] = M.diversity(None, slot_prompts, embeddings=s["embedding"])
            b.update(n)
    for key, values in M.image_indicators(images).items():
        columns[key] = values.tolist()
    for key, values in columns.items():
        for i, v in enumerate(values):
            per_image[i][key] = v
    aggregate = {
        "model": ref.describe() if ref is not None else None,
        "label": ref.label if ref is not None else None,
        "n_images": n,
        "settings": {"prompts": cfg.eval.prompts, "seeds": cfg.eval.seeds, "steps": cfg.eval.steps,
                     "guidance": cfg.eval.guidance, "shift": cfg.sampling.shift, "height": cfg.model.height,
                     "width": cfg.model.width},
        "reward": float(train_rewards.mean()) if train_rewards is not None else None,
        "reward_definition": ("the training reward of the config (same definition as summary.json's reward_before "
                              f"/ reward_after): form {cfg.reward.form}, positive {cfg.reward.positive_words}, "
                              f"negative {cfg.reward.negative_words}") if train_rewards is not None else None,
        "rewards": {r.name: {"relative_words": [r.positive, r.negative]} for r in rewards},
        "metrics": {k: mean_ci(v) for k, v in columns.items()},
        "diversity": diversity,
        "judge": judge,
        "ci": "two-sided 95% Student-t interval of the mean over images (prompt x seed slots)",
    }
    return ModelEval(ref.label if ref is not None else "images", aggregate, per_image, images)


def write_eval(result: ModelEval, out: Path) -> None:
    """``aggregate.json``, ``per_image.json`` and ``per_image.csv`` of ``result`` in ``out``."""
    write_json(out / "aggregate.json", result.aggregate)
    write_json(out / "per_image.json", result.per_image)
    write_records_csv(out / "per_image.csv", result.per_image)


def indicator_means(aggregate: dict) -> dict:
    """``{indicator: mean}`` of an aggregate (the four image indicators and pixel diversity)."""
    out = {k: (aggregate["metrics"].get(k) or {}).get("mean") for k in M.INDICATORS}
    out["diversity_pixel"] = (aggregate.get("diversity") or {}).get("pixel")
    out["frame_difference"] = (aggregate["metrics"].get("frame_difference") or {}).get("mean")  # videos only
    return out


def baseline_aggregate(spec: str, cfg, trained: bool, rewards: list[RewardSpec], train_model, out: Path,
                       log=print) -> dict:
    """The aggregate of ``--baseline``: an eval output directory's ``aggregate.json``, else the model ``spec``
    evaluated like the main one (its files written to ``out/baseline``)."""
    p = Path(spec)
    if (p / "aggregate.json").is_file():
        return json.loads((p / "aggregate.json").read_text())
    ref = resolve_model(spec, cfg, arg="--baseline", eval_dirs=True)
    res = evaluate_model(ref, cfg, trained, rewards, train_model=train_model, log=log)
    bdir = out / "baseline"
    bdir.mkdir(parents=True, exist_ok=True)
    write_eval(res, bdir)
    return res.aggregate


def attach_baseline(aggregate: dict, baseline: dict) -> None:
    """Add ``baseline`` (means, deltas of every metric and indicator, drift warnings) to ``aggregate``."""
    base_means = {k: v.get("mean") for k, v in baseline["metrics"].items()}
    delta = {}
    for k, v in aggregate["metrics"].items():
        a, b = v.get("mean"), base_means.get(k)
        if a is not None and b is not None:
            delta[k] = a - b
    for k, v in (aggregate.get("diversity") or {}).items():
        b = (baseline.get("diversity") or {}).get(k)
        if v is not None and b is not None and math.isfinite(v) and math.isfinite(b):
            delta[f"diversity.{k}"] = v - b
    if aggregate.get("reward") is not None and baseline.get("reward") is not None:
        delta["reward"] = aggregate["reward"] - baseline["reward"]
    aggregate["baseline"] = {
        "label": baseline.get("label"),
        "reward": baseline.get("reward"),
        "metrics": base_means,
        "diversity": baseline.get("diversity"),
        "judge": baseline.get("judge"),
        "delta": delta,
        "warnings": M.drift_warnings(indicator_means(baseline), indicator_means(aggregate)),
    }


def summary_lines(agg: dict) -> list[str]:
    """The aggregate as terminal lines: reward, each metric with its interval, diversity, judge, baseline."""
    lines = []
    if agg.get("reward") is not None:
        lines.append(f"reward (training definition): {agg['reward']:.6f}")
    for k, v in agg["metrics"].items():
        lo, hi = v.get("ci95_low"), v.get("ci95_high")
        ci = f"  [{format_value(lo)}, {format_value(hi)}]" if lo is not None else ""
        lines.append(f"{k:32s} {format_value(v['mean'])}{ci}")
    for k, v in (agg.get("diversity") or {}).items():
        lines.append(f"{'diversity.' + k:32s} {format_value(v)}")
    for k, v in (agg.get("judge") or {}).items():
        lines.append(f"{'judge.' + k:32s} {format_value(v, 3)}")
    b = agg.get("baseline")
    if b:
        lines.append(f"vs baseline {b.get('label')}:")
        for k, v in b["delta"].items():
            lines.append(f"  delta {k:26s} {v:+.4f}")
        for w in b["warnings"]:
            lines.append(f"  WARNING: {w}")
    return lines
