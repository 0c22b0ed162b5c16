"""The ``directalign`` command line.

    directalign train                                  # the default job: SRPO + LoRA on the tiny world (CPU)
    directalign train --config my.yaml --set train.steps=100 --set srpo.window=[10,25]
    directalign train --config my.yaml --resume        # continue the run in run.output_dir exactly
    directalign world demo                             # generate a grid with the tiny world and score it
    directalign world gates                            # measure the tiny world's quality gates
    directalign world build --out DIR                  # retrain the tiny world from scratch
    directalign sample --model runs/srpo-tiny --prompts general:photo --seeds 0 1 --out samples/x
    directalign eval --model runs/srpo-tiny            # reproduces reward_after of the run's summary.json
    directalign eval --model base --config runs/srpo-tiny/config.yaml    # reproduces reward_before
    directalign eval --model runs/srpo-tiny --baseline base --rewards train,clip:/path/to/clip
    directalign compare base runs/srpo-tiny            # side-by-side table (JSON and CSV too)
    directalign report runs/srpo-tiny                  # self-contained report.html

User errors (bad config, paths, prompts, checkpoints) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USER_ERROR = 2


def _user_errors():
    from .errors import UserError

    return (UserError, FileNotFoundError)


def _error(message: str) -> None:
    """One line on stderr, whatever the message holds (a path or a key with a newline stays on one line)."""
    print("directalign: error: " + " ".join(message.splitlines()), file=sys.stderr)


def cmd_train(args) -> int:
    from .config import load_config, resolve_config_path
    from .training import train

    cfg = load_config(resolve_config_path(args.config), args.set)
    if args.print_config:
        print(cfg.to_yaml(), end="")
        return 0
    result = train(cfg, resume=args.resume, overwrite=args.overwrite,
                   max_steps_this_session=args.max_steps_this_session)
    s = result.summary
    if "reward_after" in s:
        bo = next((v for k, v in s.items() if k.startswith("reward_best_of")), None)
        print(f"done: {result.run_dir}")
        print(f"held-out reward: before {s.get('reward_before', float('nan')):.4f}"
              + (f"  best-of-{cfg.eval.best_of} {bo:.4f}" if bo is not None else "")
              + f"  after {s['reward_after']:.4f}")
        if s.get("judge_after"):
            jb, ja = s.get("judge_before") or {}, s["judge_after"]
            for key in ("textured_share", "dark_share", "fg", "bg", "shape"):
                if key in ja:
                    print(f"  {key:15s} {jb.get(key, float('nan')):.3f} -> {ja[key]:.3f}")
    else:
        print(f"stopped at step {s.get('step')}: {result.run_dir} (continue with --resume)")
    return 0


def cmd_world(args) -> int:
    if args.world_cmd == "build":
        from .world.build import main as build_main

        build_main(args.rest)
        return 0
    if args.world_cmd == "gates":
        from .world.gates import main as gates_main

        gates_main(args.rest)
        return 0
    from .world.demo import main as demo_main

    demo_main(args.rest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="directalign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    t = sub.add_parser("train", help="fine-tune a generator against a reward (default: SRPO on the tiny world)")
    t.add_argument("--config", help="YAML file or shipped config name (default: tiny-srpo)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.steps=100 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run in run.output_dir from its newest "
                                                         "complete checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--max-steps-this-session", type=int, default=None, help=argparse.SUPPRESS)
    w = sub.add_parser("world", help="the embedded tiny world: demo | gates | build")
    w.add_argument("world_cmd", choices=("demo", "gates", "build"))
    w.add_argument("rest", nargs=argparse.REMAINDER)
    from .eval_cli import add_parsers

    add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from .compat import quiet_loading

    quiet_loading()
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command in ("sample", "eval", "compare", "report"):
            from . import eval_cli

            return getattr(eval_cli, f"cmd_{args.command}")(args)
        return cmd_world(args)
    except _user_errors() as e:
        _error(str(e))
        return EXIT_USER_ERROR
    except OSError as e:  # the environment, not a bug: a permission, a full disk, a path that vanished
        where = f" ({e.filename})" if e.filename else ""
        _error(f"{e.strerror or e}{where}; check that path, its permissions and the free disk space")
        return EXIT_USER_ERROR
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", None)
        print(f"directalign: {e}" if signum else "directalign: interrupted", file=sys.stderr)
        return 128 + (signum or 2)


if __name__ == "__main__":
    sys.exit(main())
