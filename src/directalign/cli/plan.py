"""``directalign plan``: what a config needs (parameters, FLOPs, memory per GPU, time bound), without any weights.

    directalign plan --config flux-dev-srpo-hpsv2 --set train.finetune=lora
    directalign plan --config flux-dev-srpo-hpsv2 --gpus 8 --gpu A100 --json
"""

from __future__ import annotations


def cmd_plan(args, log=print) -> int:
    from ..config import load_config, resolve_config_path
    from ..plan.estimate import plan
    from ..plan.gpus import gpu
    from ..plan.report import table, to_json

    gpu(args.gpu)  # a bad name fails before the config is read
    path = resolve_config_path(args.config)
    cfg = load_config(path, args.set)
    result = plan(cfg, gpus=args.gpus, gpu_name=args.gpu, config_name=args.config or path.stem)
    log(to_json(result) if args.json else table(result))
    return 0


def add_parser(sub) -> None:
    from ..plan.gpus import DEFAULT_GPU, GPUS

    p = sub.add_parser("plan", help="estimate parameters, FLOPs, memory per GPU and time per update of a config "
                                    "(no weights are loaded)")
    p.add_argument("--config", help="YAML file or shipped config name (default: tiny-srpo)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one setting, e.g. --set train.finetune=lora (repeatable)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs (processes) the run uses (default 1)")
    p.add_argument("--gpu", default=DEFAULT_GPU, help=f"GPU model: {', '.join(GPUS)} (default {DEFAULT_GPU})")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(run=cmd_plan)
