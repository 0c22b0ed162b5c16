"""``directalign train``: fine-tune a generator against a reward (default: SRPO + LoRA on the tiny world)."""

from __future__ import annotations

import argparse


def cmd_train(args, log=print) -> int:
    from ..config import load_config, resolve_config_path
    from ..training import train

    cfg = load_config(resolve_config_path(args.config), args.set)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = train(cfg, resume=args.resume, overwrite=args.overwrite,
                   max_steps_this_session=args.max_steps_this_session)
    s = result.summary
    if "reward_after" in s:
        bo = next((v for k, v in s.items() if k.startswith("reward_best_of")), None)
        log(f"done: {result.run_dir}")
        log(f"held-out reward: before {s.get('reward_before', float('nan')):.4f}"
            + (f"  best-of-{cfg.eval.best_of} {bo:.4f}" if bo is not None else "")
            + f"  after {s['reward_after']:.4f}")
        if s.get("judge_after"):
            jb, ja = s.get("judge_before") or {}, s["judge_after"]
            for key in ("textured_share", "dark_share", "fg", "bg", "shape"):
                if key in ja:
                    log(f"  {key:15s} {jb.get(key, float('nan')):.3f} -> {ja[key]:.3f}")
    else:
        log(f"stopped at step {s.get('step')}: {result.run_dir} (continue with --resume)")
    return 0


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="fine-tune a generator against a reward (default: SRPO on the tiny world)")
    t.add_argument("--config", help="YAML file or shipped config name (default: tiny-srpo)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.steps=100 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run in run.output_dir from its newest "
                                                         "complete checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--max-steps-this-session", type=int, default=None, help=argparse.SUPPRESS)
    t.set_defaults(run=cmd_train)
