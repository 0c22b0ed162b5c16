"""``directalign world demo | gates | build``: the embedded tiny world's own tools (each parses its own flags)."""

from __future__ import annotations

import argparse


def cmd_world(args, log=print) -> int:
    if args.world_cmd == "build":
        from ..world.build import main as tool_main
    elif args.world_cmd == "gates":
        from ..world.gates import main as tool_main
    else:
        from ..world.demo import main as tool_main
    tool_main(args.rest)
    return 0


def add_parser(sub) -> None:
    w = sub.add_parser("world", help="the embedded tiny world: demo | gates | build")
    w.add_argument("world_cmd", choices=("demo", "gates", "build"))
    w.add_argument("rest", nargs=argparse.REMAINDER)
    w.set_defaults(run=cmd_world)
