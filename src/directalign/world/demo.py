"""Generate a grid with the tiny world for a few held-out prompts and score it with its reward and its judge.

    directalign world demo [--out FILE.png] [--prompts 6] [--seeds 4] [--no-progress]

The grid goes to ``outputs/world-demo-<date>-<time>/tiny-world-demo.png`` unless ``--out`` names a file; a
progress bar (stderr) covers loading, every sampling step and scoring.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import dataset as ds
from .gates import sample
from .judge import judge
from .load import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_pipeline, load_reward


def main(argv: list[str] | None = None) -> None:
    from ..eval.output import default_out_dir
    from ..progress import add_progress_flag, bar

    p = argparse.ArgumentParser(prog="directalign world demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="PNG file to write (default: outputs/world-demo-<date>-<time>/"
                                            "tiny-world-demo.png)")
    p.add_argument("--prompts", type=int, default=6, help="number of held-out prompts")
    p.add_argument("--seeds", type=int, default=4, help="images per prompt")
    add_progress_flag(p)
    args = p.parse_args(argv)
    from ..report_images import save_grid

    out = args.out or default_out_dir("world-demo") / "tiny-world-demo.png"
    with bar(DEFAULT_STEPS + 2, "world demo", not args.no_progress, unit="step") as b:
        b.set_postfix_str("loading")
        pipe, reward = load_pipeline(), load_reward()
        b.update(1)
        b.set_postfix_str("sampling")
        prompts = ds.heldout_prompts()[: args.prompts]
        batch = [pr for pr in prompts for _ in range(args.seeds)]
        images = sample(pipe, batch, DEFAULT_STEPS, DEFAULT_GUIDANCE, seed=0, progress=b)
        b.set_postfix_str("scoring")
        with torch.no_grad():
            scores = reward(images, batch)
        verdict = judge(images)
        b.update(1)
    save_grid(images, out, ncol=args.seeds, upscale=4)
    print(f"{'prompt':45s} reward  judged (fg, bg, shape, texture, lighting) per image")
    for i, prompt in enumerate(prompts):
        idx = range(i * args.seeds, (i + 1) * args.seeds)
        judged = "; ".join(f"{verdict.fg[j]} {verdict.bg[j]} {verdict.shape[j]} {verdict.texture[j]}" for j in idx)
        print(f"{prompt:45s} {scores[list(idx)].mean():.3f}  {judged}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
