"""Write tiny-world preference pairs for offline Diffusion-DPO: per caption, the image it describes (winner) and the
same scene with foreground and background colours swapped (loser), plus a ``pairs.jsonl`` manifest.

    python -m directalign.world.export_pairs --out data/tiny-pairs --n 32
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image

from . import dataset as ds


def _save(image, path: Path) -> None:
    Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


def export(out: Path, n: int, seed: int = 0, split: str = "train") -> Path:
    """Write ``n`` pairs under ``out`` and return the manifest's path."""
    out.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, e in enumerate(ds.sample_examples(n, seed=seed, split=split)):
        winner, loser = f"{i:05d}.winner.png", f"{i:05d}.loser.png"
        _save(ds.render(e.attrs), out / winner)
        _save(ds.render(replace(e.attrs, fg=e.attrs.bg, bg=e.attrs.fg)), out / loser)
        lines.append(json.dumps({"prompt": e.caption, "winner": winner, "loser": loser}))
    manifest = out / "pairs.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print(f"wrote {args.n} pairs and their manifest {export(args.out, args.n, args.seed)}")


if __name__ == "__main__":
    main()
