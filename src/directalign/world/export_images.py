"""Write rendered tiny-world images with .txt captions: example data for offline SRPO.

    python -m directalign.world.export_images --out data/tiny-real --n 64
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from . import dataset as ds


def export(out: Path, n: int, seed: int = 0, split: str = "train") -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, e in enumerate(ds.sample_examples(n, seed=seed, split=split)):
        arr = (ds.render(e.attrs).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = out / f"{i:05d}.png"
        Image.fromarray(arr).save(path)
        path.with_suffix(".txt").write_text(e.caption + "\n", encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"wrote {len(export(args.out, args.n, args.seed))} images with captions to {args.out}")


if __name__ == "__main__":
    main()
