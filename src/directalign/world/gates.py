"""Measure the tiny world's quality gates and write them as JSON.

    directalign world gates [--out docs/tiny-world-gates.json] [--n 512]

* reward: held-out image -> caption top-1 among the true caption and every caption that differs in one attribute;
* generator: the analytic judge's hit rates on held-out prompts naming every attribute, at the default sampling
  settings (:data:`directalign.world.load.DEFAULT_STEPS`, :data:`DEFAULT_GUIDANCE`);
* speed: seconds to sample 64 images at the default settings (median of 3, after one warm-up);
* size of the shipped weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from . import dataset as ds
from .judge import attribute_rates
from .load import DEFAULT_GUIDANCE, DEFAULT_STEPS, load_pipeline, load_reward, world_dir

THRESHOLDS = {"reward_top1": 0.80, "fg": 0.90, "bg": 0.95, "shape": 0.70, "texture": 0.80, "lighting": 0.80,
              "seconds_64_images": 10.0, "weights_mb": 25.0}


def one_attribute_alternatives(attrs: ds.Attributes) -> list[ds.Attributes]:
    """Every attribute set that differs from ``attrs`` in exactly one captioned attribute."""
    out = []
    for c in ds.COLORS:
        if c not in (attrs.fg, attrs.bg):
            out.append(ds.with_style(attrs, fg=c))
            out.append(ds.with_style(attrs, bg=c))
    out += [ds.with_style(attrs, shape=s) for s in ds.SHAPES if s != attrs.shape]
    out += [ds.with_style(attrs, texture=t) for t in ds.TEXTURES if t != attrs.texture]
    out += [ds.with_style(attrs, lighting=lt) for lt in ds.LIGHTINGS if lt != attrs.lighting]
    return out


@torch.no_grad()
def reward_retrieval(reward, n: int, seed: int = 123) -> dict:
    examples = ds.sample_examples(n, seed=seed, split="heldout")
    images = ds.render_batch(examples)
    state = reward.encode_images(images)
    hits = []
    for i, e in enumerate(examples):
        captions = [ds.caption(e.attrs)] + [ds.caption(a) for a in one_attribute_alternatives(e.attrs)]
        scores = reward.score_texts(state[i : i + 1].expand(len(captions), -1), captions)
        hits.append(int(scores.argmax()) == 0)
    return {"reward_top1": sum(hits) / len(hits), "n": n}


def held_out_gate_prompts(n: int, seed: int = 0) -> list[str]:
    examples = ds.sample_examples(n, seed=seed + 99, split="heldout")
    return [ds.caption(e.attrs, True, True) for e in examples]


@torch.no_grad()
def generator_rates(pipe, n: int, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                    seed: int = 0) -> dict:
    prompts = held_out_gate_prompts(n, seed)
    images = []
    for i in range(0, n, 64):
        images.append(sample(pipe, prompts[i : i + 64], steps, guidance, seed + i))
    return attribute_rates(torch.cat(images), prompts)


def sample(pipe, prompts: list[str], steps: int, guidance: float, seed: int) -> torch.Tensor:
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=ds.RESOLUTION,
                width=ds.RESOLUTION, max_sequence_length=pipe.tokenizer.model_max_length, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def sampling_seconds(pipe, n: int = 64, repeats: int = 3) -> float:
    prompts = held_out_gate_prompts(n, seed=5)
    sample(pipe, prompts[:8], DEFAULT_STEPS, DEFAULT_GUIDANCE, 0)  # warm-up
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        sample(pipe, prompts, DEFAULT_STEPS, DEFAULT_GUIDANCE, r)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def weights_mb() -> float:
    root = world_dir()
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "_work" not in p.parts) / 1e6


def measure(n: int) -> dict:
    torch.set_num_threads(2)
    pipe = load_pipeline()
    reward = load_reward()
    result = {}
    result.update(reward_retrieval(reward, n))
    result.update(generator_rates(pipe, n))
    result["seconds_64_images"] = sampling_seconds(pipe)
    result["weights_mb"] = weights_mb()
    result["settings"] = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "n_prompts": n,
                          "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                          "cpu_count": __import__("os").cpu_count()}
    result["passed"] = {k: (result[k] <= v if k in ("seconds_64_images", "weights_mb") else result[k] >= v)
                        for k, v in THRESHOLDS.items()}
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="directalign world gates", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("docs/tiny-world-gates.json"))
    p.add_argument("--n", type=int, default=512)
    args = p.parse_args(argv)
    result = measure(args.n)
    print(f"{'gate':20s} {'measured':>10s} {'threshold':>10s}  ok")
    for k, v in THRESHOLDS.items():
        op = "<=" if k in ("seconds_64_images", "weights_mb") else ">="
        print(f"{k:20s} {result[k]:10.3f} {op + str(v):>10s}  {'yes' if result['passed'][k] else 'NO'}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
