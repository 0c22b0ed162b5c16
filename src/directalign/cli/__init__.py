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

One module per command group: :mod:`.train`, :mod:`.world`, :mod:`.eval` (sample, eval, compare, report).
User errors (bad config, paths, prompts, checkpoints) print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import UserError
from . import eval as eval_commands
from . import plan as plan_commands
from . import train as train_commands
from . import world as world_commands

EXIT_USER_ERROR = 2


def _error(message: str) -> None:
    """One line on stderr, whatever the message holds (a path or a key with a newline stays on one line)."""
    print("directalign: error: " + " ".join(message.splitlines()), file=sys.stderr)


def build_parser(command: str | None = "sample") -> argparse.ArgumentParser:
    """The parser of every command; ``sample``'s steering flags only when ``command`` is ``sample``, so that the
    parsers of the other commands (and ``directalign --help``) are built without importing torch."""
    p = argparse.ArgumentParser(prog="directalign", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    train_commands.add_parser(sub)
    world_commands.add_parser(sub)
    eval_commands.add_parsers(sub, steer=command == "sample")
    plan_commands.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    from ..compat import quiet_loading

    quiet_loading()
    try:
        return args.run(args)
    except (UserError, FileNotFoundError) as e:
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

