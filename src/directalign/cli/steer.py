"""``directalign sample --steer NAME``: steered sampling (directalign.steer), its flags and its outputs.

The flags ``--steer-<option>`` come from the steerers' option dataclasses (``Steerer.Options``): one flag per option
name, shared by the steerers that have an option of that name (``--steer-n``: best-of-n, noise-search and fk); each
steerer keeps its own default. A flag the chosen steerer does not take is a one-line error.

The reward steering maximises is ``--steer-reward`` in the ``--rewards`` syntax (default ``train`` when the settings
define a training reward): ``train`` scores with the run's held-out reward (the number ``eval`` reports as
``reward``), any other spec with its absolute score. The manifest gains ``reward`` and the chosen candidate per
image; ``steer.json`` holds the same plus the run's NFE (with and without gradient), reward calls and seconds.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


def _option_flags() -> dict[str, dict]:
    """``{flag: {"dest", "type", "choices", "help", "steerers": {name: default}}}`` over every steerer's options."""
    from ..steer.base import flag_name
    from ..steer.registry import STEERERS

    flags: dict[str, dict] = {}
    for name, steerer in STEERERS.items():
        for f in dataclasses.fields(steerer.Options):
            flag = flag_name(f)
            entry = flags.setdefault(flag, {"dest": flag[2:].replace("-", "_"), "type": type(f.default),
                                            "choices": f.metadata.get("choices"), "help": {}, "fields": {}})
            entry["help"][name] = f"{f.metadata['help']} (default {f.default})"
            entry["fields"][name] = f.name
    return flags


def add_steer_flags(p) -> None:
    from ..steer.registry import STEERERS

    p.add_argument("--steer", choices=list(STEERERS), help="steer sampling towards a reward: " + ", ".join(STEERERS))
    for flag, e in _option_flags().items():
        kind = e["type"] if e["type"] in (int, float, str) else str
        # choices are checked by the steerer's options (one-line error), not argparse (usage + error)
        metavar = "{" + ",".join(e["choices"]) + "}" if e["choices"] else kind.__name__.upper()
        p.add_argument(flag, dest=e["dest"], type=kind, metavar=metavar,
                       help="; ".join(f"{n}: {h}" for n, h in e["help"].items()))
    p.add_argument("--steer-reward", metavar="SPEC",
                   help="the reward to steer by: train, tiny-world or KIND:PATH (default: train)")


def _given(args) -> list[tuple[str, dict]]:
    return [(flag, e) for flag, e in _option_flags().items() if getattr(args, e["dest"], None) is not None]


def check_steer_flags(args) -> None:
    """One-line errors for steering flags that do not fit, before anything loads."""
    from ..steer import SteerError

    given = _given(args)
    if getattr(args, "steer", None) is None:
        if given or getattr(args, "steer_reward", None) is not None:
            flag = given[0][0] if given else "--steer-reward"
            raise SteerError(f"{flag} needs --steer (e.g. --steer best-of-n)")
        return
    for flag, e in given:
        if args.steer not in e["fields"]:
            raise SteerError(f"{flag} applies to --steer {' / '.join(e['fields'])} only, not {args.steer}")
    if args.steer_reward is not None and ("," in args.steer_reward or not args.steer_reward.strip()):
        raise SteerError(f"--steer-reward takes one reward spec, got {args.steer_reward!r}")
    options(args)  # range checks


def options(args):
    """The chosen steerer's options from the flags (its defaults elsewhere), validated."""
    from ..steer.run import build_options

    return build_options(args.steer, {e["fields"][args.steer]: getattr(args, e["dest"]) for _, e in _given(args)})


def settings(args, cfg):
    from ..steer import SteerSettings

    return SteerSettings.from_config(cfg, options(args))


def run_steer(args, adapter, cfg, trained: bool, prompts: list[str], seeds: list[int], label: str):
    """Steered images of every (prompt, seed) slot (a SteerResult), with a progress bar over the NFE."""
    from ..eval.scoring import requested_rewards
    from ..steer.run import reward_function, steer_with

    spec = requested_rewards([args.steer_reward] if args.steer_reward else None, trained)[0].strip()
    return steer_with(args.steer, adapter, reward_function(spec, cfg, trained), spec, prompts, seeds,
                      settings(args, cfg), cfg.run.progress, label)


def per_image(result) -> list[dict]:
    """The manifest fields steering adds to each image: its reward and the chosen candidate."""
    return [{"reward": float(r), "steer": c} for r, c in zip(result.rewards.tolist(), result.chosen)]


def write_steer(result, name: str, records: list[dict], out: Path) -> dict:
    """``steer.json`` in ``out``: the method, its options and reward, the run's costs and every image's record."""
    extra = {k: v for k, v in result.extra.items() if k not in ("reward_spec", "options", "start_rewards")}
    doc = {"steer": name, "reward_spec": result.extra.get("reward_spec"), "options": result.extra.get("options"),
           **result.costs(), "images": len(records), "mean_reward": float(result.rewards.mean()), **extra,
           "per_image": records}
    if "start_rewards" in result.extra:
        doc["mean_start_reward"] = sum(result.extra["start_rewards"]) / len(records)
    starts = [c["start_reward"] for c in result.chosen if "start_reward" in c]
    if len(starts) == len(records) and records:
        doc["mean_start_reward"] = sum(starts) / len(starts)
    (out / "steer.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc
