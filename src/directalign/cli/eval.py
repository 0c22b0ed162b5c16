"""``directalign sample | eval | compare | report``: generate, score and compare models and runs.

Models (``--model``, or the positional ``MODEL`` arguments of ``compare``): ``tiny-world``; ``base`` (the base model
of the settings config); a run directory (its base model with its exported LoRA or transformer); an exported
transformer or LoRA directory (applied to ``--base``); a diffusers pipeline directory or hub id (see
:mod:`directalign.eval.models`).

Output: ``--out``, else a new ``outputs/<command>-<model>-<date>-<time>/`` under the current directory (``outputs/``
is git-ignored); the command prints where it wrote. Progress bars go to stderr (``--no-progress`` hides them).

Settings (prompts, seeds, steps, guidance, shift, resolution and the run's training reward) come from ``--config``,
else from the run's own ``config.yaml`` when the model is a run directory, else from the shipped ``tiny-srpo``
config (tiny-world models) or plain defaults (other models); flags such as ``--prompts`` or ``--seeds`` override
them. With a run's config, ``reward`` in ``aggregate.json`` is the run's training reward computed by
:func:`directalign.eval.heldout.evaluate`, the number ``summary.json`` reports: ``directalign eval --model RUN``
reproduces ``reward_after`` and ``directalign eval --model base --config RUN/config.yaml`` reproduces
``reward_before``.

Rewards (``--rewards``, comma-separated; every kind of the reward registry, directalign.rewards.registry.LOADERS):

{reward_specs}

``train`` is the config's training reward model; ``KIND:PATH`` loads a registered kind's weights (a local path or a
hub id; directalign.rewards.zoo lists what each kind loads). For each reward every image gets its absolute score
with the prompt and the SGP-style relative score ``s("<pos>. <prompt>") - s("<neg>. <prompt>")``
(``--relative-words POS NEG``; default ``{tiny_pos}``/``{tiny_neg}`` for the tiny world's reward,
``{general_pos}``/``{general_neg}`` otherwise, as in the SRPO paper's SGP-HPS).
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

from ..eval.scoring import GENERAL_RELATIVE_WORDS, TINY_RELATIVE_WORDS, reward_spec_help
from ..progress import add_progress_flag
from .steer import add_steer_flags as steer_flags

if __doc__:  # (None under python -OO)
    __doc__ = __doc__.format(reward_specs=textwrap.fill(reward_spec_help(), 116, initial_indent="    ",
                                                        subsequent_indent="    "),
                             tiny_pos=TINY_RELATIVE_WORDS[0], tiny_neg=TINY_RELATIVE_WORDS[1],
                             general_pos=GENERAL_RELATIVE_WORDS[0], general_neg=GENERAL_RELATIVE_WORDS[1])


def cmd_sample(args, log=print) -> int:
    from ..eval.heldout import eval_slots, generate_slots, sampling_steps
    from ..eval.images import save_images
    from ..eval.models import load_model, resolve_model
    from ..eval.output import check_out_dir, default_out_dir, prepare_out_dir
    from ..eval.settings import flag_overrides, settings_config
    from ..progress import bar
    from ..prompts import load_prompts
    from ..report_images import save_grid
    from .steer import check_steer_flags, per_image, run_steer, write_steer

    check_steer_flags(args)
    ref = resolve_model(args.model, None, args.base)
    cfg, trained = settings_config(args.config, [ref], flag_overrides(args))
    if args.config is not None:
        ref = resolve_model(args.model, cfg, args.base)
    prompts = load_prompts(cfg.eval.prompts)
    out = check_out_dir(Path(args.out) if args.out else default_out_dir("sample", ref.label), args.overwrite,
                        "manifest.jsonl")
    adapter = load_model(ref, cfg)
    slot_prompts, slot_seeds = eval_slots(prompts, cfg.eval.seeds)
    result = extra = None
    if args.steer:
        result = run_steer(args, adapter, cfg, trained, slot_prompts, slot_seeds, ref.label)
        images, extra = result.images, per_image(result)
    else:
        with bar(sampling_steps(len(slot_prompts), cfg), f"{ref.label}: sampling", cfg.run.progress, unit="step",
                 postfix=f"{len(slot_prompts)} images") as b:
            images = generate_slots(adapter, slot_prompts, slot_seeds, cfg, b)
    prepare_out_dir(out, args.overwrite, "manifest.jsonl")
    records = save_images(images, slot_prompts, slot_seeds, cfg, ref, out, extra)
    save_grid(images, out / "grid.png", ncol=len(cfg.eval.seeds) * max(1, 8 // len(cfg.eval.seeds)))
    if result is not None:
        doc = write_steer(result, args.steer, records, out)
        log(f"{args.steer}: mean reward {doc['mean_reward']:.4f} ({doc['reward_spec']}), NFE {doc['nfe_no_grad']} "
            f"(+{doc['nfe_grad']} with gradient), {doc['reward_calls']} reward calls, {doc['seconds']:.1f} s")
    log(f"wrote {len(slot_prompts)} images and manifest.jsonl{' and steer.json' if result else ''} to {out}")
    return 0


def cmd_eval(args, log=print) -> int:
    from ..eval import EvalError
    from ..eval.evaluate import (
        attach_baseline,
        baseline_aggregate,
        evaluate_model,
        summary_lines,
        write_eval,
    )
    from ..eval.images import load_image_folder, save_images
    from ..eval.models import resolve_model
    from ..eval.output import check_out_dir, default_out_dir, prepare_out_dir
    from ..eval.scoring import load_rewards, requested_rewards, training_reward_model
    from ..eval.settings import flag_overrides, settings_config

    if args.model is None and args.images is None:
        raise EvalError("give --model (to generate) or --images (a folder with manifest.jsonl to score)")
    if args.images is not None:
        folder = Path(args.images)
        images, records = load_image_folder(folder)
        ref = resolve_model(args.model, None, args.base) if args.model else None
        cfg, trained = settings_config(args.config, [ref] if ref else [], flag_overrides(args))
        world_images = all(r.get("base") == "tiny-world" for r in records)
        if args.config is None and (ref is None or ref.cfg is None) and not world_images:
            trained = False  # nothing defines a training reward for these images
        name = folder.resolve().name
    else:
        ref = resolve_model(args.model, None, args.base)
        cfg, trained = settings_config(args.config, [ref], flag_overrides(args))
        if args.config is not None:
            ref = resolve_model(args.model, cfg, args.base)
        images = records = None
        name = ref.label
    out = Path(args.out) if args.out else default_out_dir("eval", name)
    if images is not None and Path(args.images).resolve().is_relative_to(out.resolve()):
        raise EvalError(f"--images {args.images!r} lies inside --out {str(out)!r}; write the scores elsewhere")
    check_out_dir(out, args.overwrite, "aggregate.json")
    if args.baseline and not (Path(args.baseline) / "aggregate.json").is_file():
        resolve_model(args.baseline, cfg, arg="--baseline", eval_dirs=True)  # a bad --baseline fails before any work
    specs = requested_rewards(args.rewards, trained)
    train_model = training_reward_model(cfg) if trained else None
    rewards = load_rewards(specs, cfg, trained, args.relative_words, train_model)
    result = evaluate_model(ref, cfg, trained, rewards, images=images, records=records, train_model=train_model,
                            log=log)
    prepare_out_dir(out, args.overwrite, "aggregate.json")
    if images is not None:
        result.aggregate["settings"] = {"images": str(Path(args.images).resolve())}
    if args.baseline:
        base = baseline_aggregate(args.baseline, cfg, trained, rewards, train_model, out, log)
        attach_baseline(result.aggregate, base)
    if not args.no_images and images is None:
        save_images(result.images, [r["prompt"] for r in result.per_image], [r["seed"] for r in result.per_image],
                    cfg, ref, out / "images")
    write_eval(result, out)
    for line in summary_lines(result.aggregate):
        log(line)
    log(f"wrote {out / 'aggregate.json'}, per_image.json, per_image.csv")
    return 0


def cmd_compare(args, log=print) -> int:
    from ..eval import EvalError
    from ..eval.compare import format_table, unique_labels, write_comparison
    from ..eval.evaluate import evaluate_model
    from ..eval.models import resolve_model
    from ..eval.output import check_out_dir, default_out_dir, prepare_out_dir
    from ..eval.scoring import load_rewards, requested_rewards, training_reward_model
    from ..eval.settings import flag_overrides, settings_config

    if len(args.models) < 2:
        raise EvalError("compare needs at least two MODEL arguments (models, runs or eval output directories); "
                        "e.g. directalign compare base runs/srpo-tiny")
    named = {"arg": "compare MODEL", "eval_dirs": True}  # how errors name a positional argument
    order: list = []  # per model: a ModelRef to evaluate, or (label, aggregate) of an eval output directory
    for spec in args.models:
        p = Path(spec)
        if (p / "aggregate.json").is_file():
            agg = json.loads((p / "aggregate.json").read_text())
            order.append((agg.get("label") or p.name, agg))
        else:
            order.append(resolve_model(spec, None, args.base, **named))
    out = check_out_dir(Path(args.out) if args.out else default_out_dir("compare"), args.overwrite, "compare.json")
    pending = [item for item in order if not isinstance(item, tuple)]
    cfg = trained = rewards = train_model = None
    if pending:
        cfg, trained = settings_config(args.config, pending, flag_overrides(args))
        pending = [resolve_model(r.spec, cfg, args.base, **named) for r in pending]  # again, with the settings' base
        train_model = training_reward_model(cfg) if trained else None
        rewards = load_rewards(requested_rewards(args.rewards, trained), cfg, trained, args.relative_words,
                               train_model)
    resolved = iter(pending)
    evals: list[tuple[str, dict]] = []
    for item in order:
        if isinstance(item, tuple):
            evals.append(item)
        else:
            ref = next(resolved)
            evals.append((ref.label, evaluate_model(ref, cfg, trained, rewards, train_model=train_model,
                                                    log=log).aggregate))
    evals = list(zip(unique_labels([label for label, _ in evals]), [agg for _, agg in evals]))
    cols, rows, warnings = write_comparison(evals, prepare_out_dir(out, args.overwrite, "compare.json"))
    log(format_table(cols, rows))
    for label, ws in warnings.items():
        for wmsg in ws:
            log(f"WARNING ({label} vs {evals[0][0]}): {wmsg}")
    log(f"wrote {out / 'compare.json'} and compare.csv")
    return 0


def cmd_report(args, log=print) -> int:
    from ..report import write_report

    path = write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    log(f"wrote {path}")
    return 0


# -------------------------------------------------------------------------------------------------- parsers
def _add_settings(p, config_help: str) -> None:
    p.add_argument("--config", help=config_help)
    p.add_argument("--prompts", help="prompt source: tiny-world:heldout, general[:<category>], or a .txt/.jsonl/.csv")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds per prompt (e.g. --seeds 0 1 2 3)")
    p.add_argument("--steps", type=int, help="sampling steps")
    p.add_argument("--guidance", type=float, help="guidance scale")
    p.add_argument("--shift", type=float, help="scheduler shift (sampling.shift)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--batch-size", type=int, help="images per generation batch")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--base", help="base model for a bare transformer or LoRA directory (default: the config's "
                                  "model.path, else tiny-world)")
    p.add_argument("--out", help="output directory (default: a new outputs/<command>-<name>-<time>/)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory of this command")
    add_progress_flag(p)


def _add_rewards(p) -> None:
    p.add_argument("--rewards", action="append", metavar="LIST",
                   help=f"comma-separated rewards: {reward_spec_help()} (default: the config's training reward)")
    p.add_argument("--relative-words", nargs=2, metavar=("POS", "NEG"),
                   help="control phrases of the relative metric (default: {} {} for the tiny world, '{}' '{}' "
                        "otherwise)".format(*TINY_RELATIVE_WORDS, *GENERAL_RELATIVE_WORDS))


def add_parsers(sub, steer: bool = True) -> None:
    """The ``sample``, ``eval``, ``compare`` and ``report`` subcommands, each with its ``run`` function; ``sample``
    has the ``--steer`` flags only when ``steer`` (they come from the steerers' options, whose modules import
    torch)."""
    cfg_help = ("YAML or shipped config name for the settings and training reward (default: the run's "
                "config.yaml, else tiny-srpo for the tiny world)")
    fmt = {"description": __doc__, "formatter_class": argparse.RawDescriptionHelpFormatter}
    s = sub.add_parser("sample", help="generate images with a model or run, plus a manifest to regenerate them",
                       **fmt)
    s.add_argument("--model", required=True, help="base | tiny-world | run dir | exported or pipeline dir")
    _add_settings(s, cfg_help)
    if steer:
        steer_flags(s)
    s.set_defaults(run=cmd_sample)
    e = sub.add_parser("eval", help="generate with fixed seeds (or take --images) and score with several rewards",
                       **fmt)
    e.add_argument("--model", help="base | tiny-world | run dir | exported or pipeline dir")
    e.add_argument("--images", help="score this folder (with manifest.jsonl) instead of generating")
    e.add_argument("--baseline", help="a model or an eval output directory to report differences against")
    e.add_argument("--no-images", action="store_true", help="do not save the generated images")
    _add_settings(e, cfg_help)
    _add_rewards(e)
    e.set_defaults(run=cmd_eval)
    c = sub.add_parser("compare", help="side-by-side table of several models, runs or eval directories", **fmt)
    c.add_argument("models", nargs="+", metavar="MODEL",
                   help="a model (base | tiny-world | run dir | exported or pipeline dir) or an eval output directory; "
                        "give two or more, the first is the reference")
    _add_settings(c, cfg_help)
    _add_rewards(c)
    c.set_defaults(run=cmd_compare)
    r = sub.add_parser("report", help="write a self-contained report.html for a run directory")
    r.add_argument("run_dir")
    r.add_argument("--out", help="output file (default: RUN_DIR/report.html)")
    r.set_defaults(run=cmd_report)
