"""``directalign train``: fine-tune a generator against a reward (default: SRPO + LoRA on the tiny world)."""

from __future__ import annotations

import argparse
import math


def cmd_train(args, log=print) -> int:
    from ..config import load_config, resolve_config_path
    from ..training import train

    if isinstance(args.resume, str):  # --resume RUN_DIR: the run's own config.yaml and the overrides it allows
        from ..api import RunError, resume_config

        if args.config:
            raise RunError(f"--resume {args.resume} continues with the run's own config.yaml; drop --config (or "
                           "give --config with a bare --resume)")
        cfg = resume_config(args.resume, args.set)
    else:
        cfg = load_config(resolve_config_path(args.config), args.set)
    if args.print_config:  # a config from a file or --set: every key marked with its source (config_sources)
        from ..config_sources import annotated_yaml

        print(cfg.to_yaml() if isinstance(args.resume, str) else
              annotated_yaml(cfg, resolve_config_path(args.config), args.set), end="")
        return 0
    if not args.resume:  # a partial YAML of the user's on the tiny world: say which defaults are not the tiny job's
        from ..config_sources import defaults_notice

        note = defaults_notice(cfg, resolve_config_path(args.config), args.set)
        if note:
            log(note)
    result = train(cfg, resume=bool(args.resume), overwrite=args.overwrite,
                   max_steps_this_session=args.max_steps_this_session)
    s = result.summary
    if result.already_complete or "reward_after" in s:
        if not result.already_complete:  # (a complete run: train() has said that nothing was done)
            log(f"done: {result.run_dir}")
        log_results(s, log)
        if not result.already_complete and not s.get("report"):
            log(f"report: not written (run.report=false); write it with `directalign report {result.run_dir}`")
    else:
        log(f"stopped at step {s.get('step')}: {result.run_dir} (continue with: directalign train --resume "
            f"{result.run_dir})")
    return 0


def _num(value, digits: int = 4) -> str | None:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else None


def log_results(s: dict, log=print) -> None:
    """The held-out numbers of a run's summary.json, the base model's as "not measured (why)" when the summary has
    none (eval.before=false, or a base evaluation on other eval settings), and where the report is."""
    missing = f"not measured ({s.get('before_not_measured') or 'no base evaluation recorded'})"
    before = _num(s.get("reward_before"))
    best = next(((k.rsplit("_", 1)[-1], _num(v)) for k, v in s.items() if k.startswith("reward_best_of_")
                 and _num(v) is not None), None)
    log(f"held-out reward: before {before or missing}" + (f"  best-of-{best[0]} {best[1]}" if best else "")
        + f"  after {_num(s.get('reward_after')) or '-'}")
    jb, ja = s.get("judge_before") or {}, s.get("judge_after") or {}
    for key in ja:
        log(f"  {key:15s} {_num(jb.get(key), 3) or 'not measured'} -> {_num(ja[key], 3) or '-'}")
    report = s.get("report")
    if report:
        log(f"report: {report}")


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="fine-tune a generator against a reward (default: SRPO on the tiny world)")
    t.add_argument("--config", help="YAML file or shipped config name (default: tiny-srpo). Keys the file leaves "
                                    "unset take the built-in defaults: the tiny world's model, reward and prompts, "
                                    "but FLUX.1-dev's official sampling, train and method settings, not the tiny "
                                    "job's (--print-config marks each default)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.steps=100 (repeatable)")
    t.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                   help="continue a run from its newest complete checkpoint: --resume RUN_DIR takes the run's own "
                        "config.yaml (--set may change only train.steps, eval.*, run.*, model.device/path); a bare "
                        "--resume continues run.output_dir of --config/--set")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--print-config", action="store_true", help="print the resolved config, each key marked with "
                                                               "where it comes from (file, --set or default), and exit")
    t.add_argument("--max-steps-this-session", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(run=cmd_train)
