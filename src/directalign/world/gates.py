"""Measure the tiny world's quality gates and write them as JSON.

    directalign world gates [--out FILE] [--n 512] [--no-progress]

It writes to ``outputs/world-gates-<date>-<time>/tiny-world-gates.json`` unless ``--out`` says otherwise; the
measured gates the docs cite are ``docs/tiny-world-gates.json``, replaced only with ``--out
docs/tiny-world-gates.json``. An overall progress bar (stderr) covers every image the gates score or generate.

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


def _advance(progress, n: int) -> None:
    if progress is not None:
        progress.update(n)


@torch.no_grad()
def reward_retrieval(reward, n: int, seed: int = 123, progress=None) -> dict:
    """Top-1 rate of the true caption among its one-attribute alternatives (``progress``: a tqdm bar or None)."""
    examples = ds.sample_examples(n, seed=seed, split="heldout")
    images = ds.render_batch(examples)
    state = reward.encode_images(images)
    hits = []
    for i, e in enumerate(examples):
        captions = [ds.caption(e.attrs)] + [ds.caption(a) for a in one_attribute_alternatives(e.attrs)]
        scores = reward.score_texts(state[i : i + 1].expand(len(captions), -1), captions)
        hits.append(int(scores.argmax()) == 0)
        _advance(progress, 1)
    return {"reward_top1": sum(hits) / len(hits), "n": n}


def held_out_gate_prompts(n: int, seed: int = 0) -> list[str]:
    examples = ds.sample_examples(n, seed=seed + 99, split="heldout")
    return [ds.caption(e.attrs, True, True) for e in examples]


@torch.no_grad()
def generator_rates(pipe, n: int, steps: int = DEFAULT_STEPS, guidance: float = DEFAULT_GUIDANCE,
                    seed: int = 0, progress=None) -> dict:
    prompts = held_out_gate_prompts(n, seed)
    images = []
    for i in range(0, n, 64):
        images.append(sample(pipe, prompts[i : i + 64], steps, guidance, seed + i))
        _advance(progress, len(prompts[i : i + 64]))
    return attribute_rates(torch.cat(images), prompts)


def sample(pipe, prompts: list[str], steps: int, guidance: float, seed: int, progress=None) -> torch.Tensor:
    """Images (N, 3, 32, 32) in [0, 1]; ``progress`` (a tqdm bar or None) advances by one per sampling step."""
    extra = {}
    if progress is not None:
        def step_done(_pipe, _i, _t, callback_kwargs):
            progress.update(1)
            return callback_kwargs  # unchanged: the latents go on as they were

        extra["callback_on_step_end"] = step_done
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=ds.RESOLUTION,
                width=ds.RESOLUTION, max_sequence_length=pipe.tokenizer.model_max_length, output_type="pt",
                generator=torch.Generator().manual_seed(seed), **extra).images


TIMING_IMAGES, TIMING_REPEATS, WARM_UP_IMAGES = 64, 3, 8


def sampling_seconds(pipe, n: int = TIMING_IMAGES, repeats: int = TIMING_REPEATS, progress=None) -> float:
    prompts = held_out_gate_prompts(n, seed=5)
    sample(pipe, prompts[:WARM_UP_IMAGES], DEFAULT_STEPS, DEFAULT_GUIDANCE, 0)  # warm-up
    _advance(progress, WARM_UP_IMAGES)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        sample(pipe, prompts, DEFAULT_STEPS, DEFAULT_GUIDANCE, r)
        times.append(time.perf_counter() - t0)
        _advance(progress, n)  # outside the timed span
    return statistics.median(times)


def weights_mb() -> float:
    root = world_dir()
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "_work" not in p.parts) / 1e6


def measure(n: int, progress: bool = True) -> dict:
    """Every gate at ``n`` held-out prompts, with one progress bar over all of it unless ``progress`` is false."""
    from ..progress import bar

    torch.set_num_threads(2)
    pipe = load_pipeline()
    reward = load_reward()
    result = {}
    total = 2 * n + WARM_UP_IMAGES + TIMING_REPEATS * TIMING_IMAGES
    with bar(total, "world gates", progress, unit="img") as b:
        b.set_postfix_str("reward retrieval")
        result.update(reward_retrieval(reward, n, progress=b))
        b.set_postfix_str("generator rates")
        result.update(generator_rates(pipe, n, progress=b))
        b.set_postfix_str("sampling speed")
        result["seconds_64_images"] = sampling_seconds(pipe, TIMING_IMAGES, TIMING_REPEATS, progress=b)
    result["weights_mb"] = weights_mb()
    result["settings"] = {"steps": DEFAULT_STEPS, "guidance": DEFAULT_GUIDANCE, "n_prompts": n,
                          "torch_threads": torch.get_num_threads(), "machine": platform.machine(),
                          "cpu_count": __import__("os").cpu_count()}
    result["passed"] = {k: (result[k] <= v if k in ("seconds_64_images", "weights_mb") else result[k] >= v)
                        for k, v in THRESHOLDS.items()}
    return result


def main(argv: list[str] | None = None) -> None:
    from ..eval.output import default_out_dir
    from ..progress import add_progress_flag

    p = argparse.ArgumentParser(prog="directalign world gates", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="JSON file to write (default: outputs/world-gates-<date>-<time>/"
                                            "tiny-world-gates.json; docs/tiny-world-gates.json is what the docs cite)")
    p.add_argument("--n", type=int, default=512)
    add_progress_flag(p)
    args = p.parse_args(argv)
    out = args.out or default_out_dir("world-gates") / "tiny-world-gates.json"
    result = measure(args.n, progress=not args.no_progress)
    print(f"{'gate':20s} {'measured':>10s} {'threshold':>10s}  ok")
    for k, v in THRESHOLDS.items():
        op = "<=" if k in ("seconds_64_images", "weights_mb") else ">="
        print(f"{k:20s} {result[k]:10.3f} {op + str(v):>10s}  {'yes' if result['passed'][k] else 'NO'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
