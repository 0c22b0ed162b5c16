"""Retrain the whole tiny world from scratch with a fixed seed.

    python -m directalign.world.build --out src/directalign/assets/tiny-world

Stages (each writes its result before the next starts; ``--stages`` reruns a subset):

1. ``vae``: AutoencoderKL trained on rendered images (L1 + MSE + a small KL), latent scale and shift measured.
2. ``generator``: FLUX-shaped transformer and both text encoders trained jointly with the rectified-flow objective
   (``x_s = s*eps + (1-s)*x0``, target ``eps - x0``, logit-normal ``s``), 10% empty captions for guidance, EMA.
3. ``distill``: guidance distillation as for FLUX.1-dev: a student with a guidance input learns to match the
   frozen teacher's classifier-free-guided velocity ``v_u + g (v_c - v_u)`` for g in [1, 6].
4. ``reward``: a CLIPModel trained contrastively on rendered images of all 120 combinations and their captions (style
   words as suffixes or as SRPO ``"<word>. "`` prefixes; colours sometimes left out), with one-attribute-swapped
   captions as hard negatives.

Schedule. The reward does not depend on the other stages: with ``--threads 2`` or more (and ``--parallel``, the
default) the VAE trains first on every thread, then the reward trains in a second process on one thread while the
generator -> distillation chain uses the rest. Each stage runs at a fixed thread count, never one that depends on
when another process finishes, because CPU kernels round differently at different thread counts: the same command
on the same machine writes the same bytes. With the defaults the single command took 87.5 minutes on 2 idle cores
(docs/tiny-world.md).

Progress: one overall bar with an ETA on stderr (``--no-progress`` hides it); the stages' own lines still go to
stdout (see :mod:`.build_progress`).

The output directory holds ``generator/`` (diffusers format, loadable with ``FluxPipeline.from_pretrained``),
``reward/`` (``CLIPModel.from_pretrained``) and ``build_log.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

# This module is the command: the stage order, thread counts and the parallel reward process. The stages are in
# build_generator_stages (vae, generator, distill) and build_reward_stage; build_common holds LOG, the one log dict
# they all write. Their public names stay importable from here.
from .build_common import LOG
from .build_generator_stages import (
    _pipeline,
    distill_guidance,
    evaluate_generator,
    train_generator,
    train_vae,
)
from .build_progress import overall_bar
from .build_reward_stage import (
    REWARD_NAME_COLOUR_PROB,
    augment,
    reward_caption,
    train_reward,
)

__all__ = ["LOG", "REWARD_NAME_COLOUR_PROB", "augment", "distill_guidance", "evaluate_generator", "main",
           "reward_caption", "train_generator", "train_reward", "train_vae"]


def _forget_build_paths(directory: Path) -> None:
    """Drop ``_name_or_path`` from the saved component configs: diffusers records where a component was loaded from
    (here the build's scratch directory), which would tie the shipped files to the machine that built them."""
    for config in sorted(directory.glob("*/config.json")):
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")  # diffusers' own layout


# ------------------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    from diffusers import AutoencoderKL, FluxPipeline

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stages", default="vae,generator,distill,reward")
    p.add_argument("--vae-steps", type=int, default=1200)
    p.add_argument("--generator-steps", type=int, default=6000)
    p.add_argument("--distill-steps", type=int, default=600)
    p.add_argument("--reward-steps", type=int, default=2500)
    p.add_argument("--n-data", type=int, default=40000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="train the reward in a second one-thread process while the other stages run (needs "
                        "--threads >= 2 and the reward stage plus another one)")
    p.add_argument("--log-file", type=Path, help=argparse.SUPPRESS)  # the parallel reward process's own log
    p.add_argument("--no-progress", action="store_true", help="no overall progress bar (on stderr)")
    args = p.parse_args(argv)
    t_start = time.time()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    stages = set(args.stages.split(","))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = out / "_work"
    work.mkdir(exist_ok=True)
    log_path = args.log_file or out / "build_log.json"
    if log_path.exists():
        LOG.update(json.loads(log_path.read_text()))
    LOG["command"] = "python -m directalign.world.build " + " ".join(argv or sys.argv[1:])

    def save_log():
        log_path.write_text(json.dumps(LOG, indent=1))

    steps = {"vae": args.vae_steps, "generator": args.generator_steps, "distill": args.distill_steps,
             "reward": args.reward_steps}
    parallel = bool(args.parallel and "reward" in stages and stages & {"generator", "distill"} and args.threads >= 2)
    # One overall bar (stderr), not in the parallel reward process (--log-file): the parent follows its lines.
    show = not args.no_progress and args.log_file is None
    with overall_bar({s: n for s, n in steps.items() if s in stages}, parallel, show) as progress:
        stage_done = progress.stage_done if progress is not None else (lambda stage: None)
        if "vae" in stages:  # first, on every thread; the reward starts after it, so no stage shares a core
            train_vae(args.vae_steps, 32, args.seed).save_pretrained(work / "vae")
            save_log()
            stage_done("vae")

        reward_proc = None
        if parallel:
            reward_log = work / "reward_log.json"
            reward_log.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "directalign.world.build", "--out", str(out), "--stages", "reward",
                   "--threads", "1", "--seed", str(args.seed), "--reward-steps", str(args.reward_steps),
                   "--log-file", str(reward_log), "--no-parallel"]
            piped = {} if progress is None else {"stdout": subprocess.PIPE, "text": True}  # its lines move the bar
            reward_proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), **piped)
            reward_lines = progress.follow(reward_proc.stdout) if progress is not None else None
            stages = stages - {"reward"}
            torch.set_num_threads(args.threads - 1)
        if "generator" in stages:
            vae = AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False)
            comps = train_generator(vae, args.generator_steps, 64, args.seed, args.n_data, args.eval_every)
            _pipeline(comps).save_pretrained(work / "teacher")
            save_log()
            stage_done("generator")
        if "distill" in stages:
            teacher = FluxPipeline.from_pretrained(work / "teacher")
            comps = distill_guidance(dict(teacher.components), args.distill_steps, 64, args.seed, args.n_data // 2,
                                     args.eval_every // 2)
            # shards under 8 MB keep every shipped file small enough for any git host's limits
            _pipeline(comps).save_pretrained(out / "generator", max_shard_size="6MB")
            _forget_build_paths(out / "generator")
            rates = evaluate_generator(_pipeline(comps), n=256, guidance=3.5)
            LOG["generator_gate_quick"] = rates
            save_log()
            stage_done("distill")
        if "reward" in stages:
            model, tok = train_reward(args.reward_steps, 128, args.seed)
            model.save_pretrained(out / "reward")
            tok.save_pretrained(out / "reward")
            save_log()
            stage_done("reward")
        if reward_proc is not None:
            code = reward_proc.wait()
            if reward_lines is not None:
                reward_lines.join()
            if code != 0:
                raise SystemExit(f"the reward stage failed (exit {reward_proc.returncode}); its output is above")
            LOG["reward"] = json.loads(reward_log.read_text())["reward"]
            stage_done("reward")
        if args.log_file is None:
            LOG["total_seconds"] = time.time() - t_start
            save_log()


if __name__ == "__main__":
    main()
