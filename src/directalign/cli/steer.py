"""``directalign sample --steer NAME``: steered sampling (directalign.steer), its flags and its outputs.

The reward steering maximises is ``--steer-reward`` in the ``--rewards`` syntax (default ``train`` when the settings
define a training reward): ``train`` scores with the run's held-out reward (the number ``eval`` reports as
``reward``), any other spec with its absolute score. The manifest gains ``reward`` and the chosen candidate per
image; ``steer.json`` holds the same plus the run's NFE (with and without gradient), reward calls and seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

STEER_DEFAULTS = {"steer_n": 4, "steer_rounds": 2, "steer_neighbors": 4, "steer_lambda": 0.3}
SEARCH_ONLY = ("steer_rounds", "steer_neighbors", "steer_lambda")


def add_steer_flags(p) -> None:
    from ..steer.registry import STEERERS

    p.add_argument("--steer", choices=list(STEERERS), help="steer sampling towards a reward: " + ", ".join(STEERERS))
    p.add_argument("--steer-n", type=int, help="candidates (initial noises) per image (default 4)")
    p.add_argument("--steer-rounds", type=int, help="noise-search: rounds of perturbing the best noise (default 2)")
    p.add_argument("--steer-neighbors", type=int, help="noise-search: perturbations per round (default 4)")
    p.add_argument("--steer-lambda", type=float,
                   help="noise-search: perturbation size in (0, 1]: sqrt(1-l^2)*eps + l*z (default 0.3)")
    p.add_argument("--steer-reward", metavar="SPEC",
                   help="the reward to steer by: train, tiny-world or KIND:PATH (default: train)")


def check_steer_flags(args) -> None:
    """One-line errors for steering flags that do not fit, before anything loads."""
    from ..steer import SteerError

    given = [k for k in (*STEER_DEFAULTS, "steer_reward") if getattr(args, k, None) is not None]
    if getattr(args, "steer", None) is None:
        if given:
            raise SteerError(f"--{given[0].replace('_', '-')} needs --steer (e.g. --steer best-of-n)")
        return
    if args.steer != "noise-search":
        extra = [k for k in given if k in SEARCH_ONLY]
        if extra:
            raise SteerError(f"--{extra[0].replace('_', '-')} applies to --steer noise-search only")
    if args.steer_reward is not None and ("," in args.steer_reward or not args.steer_reward.strip()):
        raise SteerError(f"--steer-reward takes one reward spec, got {args.steer_reward!r}")
    settings(args, None)  # range checks


def settings(args, cfg):
    from ..steer import SteerSettings

    opts = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in STEER_DEFAULTS.items()}
    kw = {"n": opts["steer_n"], "rounds": opts["steer_rounds"], "neighbors": opts["steer_neighbors"],
          "lam": opts["steer_lambda"]}
    if cfg is None:
        return SteerSettings(1, 1.0, None, 1, 1, **kw).validate()
    return SteerSettings.from_config(cfg, **kw).validate()


def score_function(args, cfg, trained: bool):
    """``score_fn(images, prompts) -> (N,)`` of ``--steer-reward`` and its spec."""
    from ..eval.heldout import training_reward
    from ..eval.scoring import load_rewards, requested_rewards, score_images

    spec = requested_rewards([args.steer_reward] if args.steer_reward else None, trained)[0].strip()
    reward = load_rewards([spec], cfg, trained, None)[0]
    device = next(reward.model.parameters()).device
    if spec == "train":
        return (lambda images, prompts: training_reward(reward.model, images.to(device), prompts, cfg)), spec
    return (lambda images, prompts: score_images(reward, images, prompts)["score"]), spec


def run_steer(args, adapter, cfg, trained: bool, prompts: list[str], seeds: list[int], label: str):
    """Steered images of every (prompt, seed) slot (a SteerResult), with a progress bar over the NFE."""
    from ..progress import bar
    from ..steer.registry import STEERERS

    score_fn, spec = score_function(args, cfg, trained)
    steerer, s = STEERERS[args.steer], settings(args, cfg)
    with bar(steerer.nfe(len(prompts), s), f"{label}: {args.steer}", cfg.run.progress, unit="NFE",
             postfix=f"{len(prompts)} images") as b:
        s.on_step = b.update
        result = steerer.run(adapter, score_fn, prompts, seeds, s)
    result.extra["reward_spec"] = spec
    result.extra["options"] = {"n": s.n, **({"rounds": s.rounds, "neighbors": s.neighbors, "lambda": s.lam}
                                            if args.steer == "noise-search" else {})}
    return result


def per_image(result) -> list[dict]:
    """The manifest fields steering adds to each image: its reward and the chosen candidate."""
    return [{"reward": float(r), "steer": c} for r, c in zip(result.rewards.tolist(), result.chosen)]


def write_steer(result, name: str, records: list[dict], out: Path) -> dict:
    """``steer.json`` in ``out``: the method, its options and reward, the run's costs and every image's record."""
    doc = {"steer": name, "reward_spec": result.extra.get("reward_spec"), "options": result.extra.get("options"),
           **result.costs(), "images": len(records), "mean_reward": float(result.rewards.mean()),
           "per_image": records}
    if "start_rewards" in result.extra:
        doc["mean_start_reward"] = sum(result.extra["start_rewards"]) / len(records)
    (out / "steer.json").write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc
