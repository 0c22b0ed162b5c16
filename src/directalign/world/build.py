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

The output directory holds ``generator/`` (diffusers format, loadable with ``FluxPipeline.from_pretrained``),
``reward/`` (``CLIPModel.from_pretrained``) and ``build_log.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import architecture as arch
from . import dataset as ds

LOG: dict = {}


def _log(stage: str, **values) -> None:
    msg = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    print(f"[{stage}] {msg}", flush=True)


def _cosine_lr(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1 - decay)


# ------------------------------------------------------------------------------------------------------------ VAE
def train_vae(steps: int, batch: int, seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**arch.VAE_CONFIG)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    t0 = time.time()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, 1e-3, 100)
        images = ds.render_batch(ds.sample_examples(batch, seed=seed * 1_000_003 + step))
        x = images * 2 - 1
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log("vae", step=step, loss=loss.item(), kl=kl.item(), secs=time.time() - t0)
    vae.eval()
    # Measure the latent statistics FLUX stores as shift_factor / scaling_factor: z_model = (z - shift) * scale.
    with torch.no_grad():
        images = ds.render_batch(ds.sample_examples(2048, seed=seed + 7))
        z = torch.cat([vae.encode(images[i : i + 256] * 2 - 1).latent_dist.mean for i in range(0, 2048, 256)])
        rec = torch.cat([vae.decode(z[i : i + 256]).sample for i in range(0, 2048, 256)])
        psnr = -10 * torch.log10(((rec.clamp(-1, 1) + 1) / 2 - images).pow(2).mean()).item()
    shift = z.mean().item()
    scale = 1.0 / z.std().item()
    vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    LOG["vae"] = dict(steps=steps, batch=batch, psnr_db=psnr, shift_factor=shift, scaling_factor=scale,
                      seconds=time.time() - t0)
    _log("vae", psnr_db=psnr, shift=shift, scale=scale)
    return vae


# ------------------------------------------------------------------------------------------------------ generator
def _encode_latents(vae, examples: list, chunk: int = 512) -> torch.Tensor:
    """Packed, normalised latents (N, tokens, 16) of rendered examples, as FLUX's transformer sees them."""
    from diffusers import FluxPipeline

    out = []
    with torch.no_grad():
        for i in range(0, len(examples), chunk):
            x = ds.render_batch(examples[i : i + chunk]) * 2 - 1
            z = vae.encode(x).latent_dist.mean
            z = (z - vae.config.shift_factor) * vae.config.scaling_factor
            b, c, h, w = z.shape
            out.append(FluxPipeline._pack_latents(z, b, c, h, w))
    return torch.cat(out)


def _pipeline(components: dict):
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _text_embeddings(pipe, prompts: list[str]):
    """The pipeline's own prompt encoding (with gradients if the encoders are trainable)."""
    pooled = pipe._get_clip_prompt_embeds(prompts, device=torch.device("cpu"))
    tokens = pipe._get_t5_prompt_embeds(prompts, max_sequence_length=pipe.tokenizer.model_max_length,
                                        device=torch.device("cpu"))
    return tokens, pooled


def _ids(pipe, n_text: int):
    h = w = ds.RESOLUTION // pipe.vae_scale_factor
    img_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, torch.device("cpu"), torch.float32)
    txt_ids = torch.zeros(n_text, 3)
    return img_ids, txt_ids


def _velocity(transformer, x, sigma, guidance, tokens, pooled, img_ids, txt_ids):
    return transformer(hidden_states=x, timestep=sigma, guidance=guidance, pooled_projections=pooled,
                       encoder_hidden_states=tokens, txt_ids=txt_ids, img_ids=img_ids).sample


@torch.no_grad()
def evaluate_generator(pipe, n: int = 64, steps: int = 16, guidance: float = 3.5, true_cfg: float = 1.0,
                       seed: int = 0) -> dict:
    """Judge rates on held-out prompts with named styles (as the quality gate measures them)."""
    from .gates import held_out_gate_prompts
    from .judge import attribute_rates

    prompts = held_out_gate_prompts(n, seed)
    images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, height=ds.RESOLUTION,
                  width=ds.RESOLUTION, max_sequence_length=pipe.tokenizer.model_max_length, output_type="pt",
                  true_cfg_scale=true_cfg, negative_prompt=[""] * len(prompts) if true_cfg > 1 else None,
                  generator=torch.Generator().manual_seed(seed)).images
    return attribute_rates(images, prompts)


def train_generator(vae, steps: int, batch: int, seed: int, n_data: int, eval_every: int):
    torch.manual_seed(seed)
    comps = arch.new_generator_components()
    comps["vae"] = vae
    pipe = _pipeline(comps)
    examples = ds.sample_examples(n_data, seed=seed + 1)
    t0 = time.time()
    latents = _encode_latents(vae, examples)
    captions = [e.caption for e in examples]
    _log("generator", cached_latents=len(latents), secs=time.time() - t0)

    transformer, te1, te2 = comps["transformer"], comps["text_encoder"], comps["text_encoder_2"]
    trainable = [*transformer.parameters(), *te1.parameters(), *te2.parameters()]
    for m in (transformer, te1, te2):
        m.train()
    ema = copy.deepcopy(transformer).eval().requires_grad_(False)
    opt = torch.optim.AdamW(trainable, lr=5e-4, weight_decay=0.01, betas=(0.9, 0.99))
    img_ids, txt_ids = _ids(pipe, pipe.tokenizer.model_max_length)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for step in range(steps):
        lr = _cosine_lr(step, steps, 5e-4, 300)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = rng.integers(0, len(latents), batch)
        x0 = latents[idx]
        prompts = ["" if rng.random() < 0.1 else captions[i] for i in idx]
        tokens, pooled = _text_embeddings(pipe, prompts)
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        xs = sigma[:, None, None] * eps + (1 - sigma[:, None, None]) * x0
        pred = _velocity(transformer, xs, sigma, torch.ones(batch), tokens, pooled, img_ids, txt_ids)
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        _ema_update(ema, transformer, decay=min(0.999, (1 + step) / (10 + step)))
        if step % 100 == 0:
            _log("generator", step=step, loss=loss.item(), lr=lr, secs=time.time() - t0)
        if eval_every and (step + 1) % eval_every == 0:
            comps_eval = dict(comps, transformer=ema)
            rates = evaluate_generator(_pipeline(comps_eval), guidance=1.0, true_cfg=3.0)
            history.append(dict(step=step + 1, secs=time.time() - t0, **rates))
            _log("generator-eval", step=step + 1, **rates)
    comps["transformer"] = ema
    for m in (te1, te2):
        m.eval().requires_grad_(False)
    LOG["generator"] = dict(steps=steps, batch=batch, n_data=n_data, seconds=time.time() - t0, history=history)
    return comps


def distill_guidance(comps: dict, steps: int, batch: int, seed: int, n_data: int, eval_every: int,
                     g_range=(1.0, 6.0)) -> dict:
    torch.manual_seed(seed)
    pipe = _pipeline(comps)
    teacher = comps["transformer"].eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(teacher)
    examples = ds.sample_examples(n_data, seed=seed + 2)
    latents = _encode_latents(comps["vae"], examples)
    with torch.no_grad():
        tokens_all, pooled_all = _text_embeddings(pipe, [e.caption for e in examples])
        tokens_u, pooled_u = _text_embeddings(pipe, [""])
    opt = torch.optim.AdamW(student.parameters(), lr=2e-4, weight_decay=0.0, betas=(0.9, 0.99))
    img_ids, txt_ids = _ids(pipe, tokens_all.shape[1])
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.time()
    history = []
    for step in range(steps):
        lr = _cosine_lr(step, steps, 2e-4, 100)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.from_numpy(rng.integers(0, len(latents), batch))
        x0, tokens, pooled = latents[idx], tokens_all[idx], pooled_all[idx]
        sigma = torch.sigmoid(torch.randn(batch, generator=gen))
        eps = torch.randn(x0.shape, generator=gen)
        xs = sigma[:, None, None] * eps + (1 - sigma[:, None, None]) * x0
        g_scale = torch.empty(batch).uniform_(*g_range, generator=gen)
        with torch.no_grad():
            both = _velocity(teacher, torch.cat([xs, xs]), torch.cat([sigma, sigma]), torch.ones(2 * batch),
                             torch.cat([tokens, tokens_u.expand_as(tokens)]),
                             torch.cat([pooled, pooled_u.expand_as(pooled)]), img_ids, txt_ids)
            v_c, v_u = both.chunk(2)
            target = v_u + g_scale[:, None, None] * (v_c - v_u)
        pred = _velocity(student, xs, sigma, g_scale, tokens, pooled, img_ids, txt_ids)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        _ema_update(ema, student, decay=min(0.998, (1 + step) / (10 + step)))
        if step % 100 == 0:
            _log("distill", step=step, loss=loss.item(), secs=time.time() - t0)
        if eval_every and (step + 1) % eval_every == 0:
            rates = evaluate_generator(_pipeline(dict(comps, transformer=ema)), guidance=3.5)
            history.append(dict(step=step + 1, secs=time.time() - t0, **rates))
            _log("distill-eval", step=step + 1, **rates)
    LOG["distill"] = dict(steps=steps, batch=batch, g_range=list(g_range), seconds=time.time() - t0,
                          history=history)
    return dict(comps, transformer=ema.eval())


# ---------------------------------------------------------------------------------------------------------- reward
# Reward captions name shape always, each colour with this probability, and the styles the example names: partial
# captions make the text tower represent each attribute on its own, so held-out colour/shape combinations compose.
REWARD_NAME_COLOUR_PROB = 0.8


def _reward_names(names_texture: bool, names_lighting: bool, rng) -> tuple[str, ...]:
    names = ["shape"]
    names += [k for k in ("fg", "bg") if rng.random() < REWARD_NAME_COLOUR_PROB]
    names += (["texture"] if names_texture else []) + (["lighting"] if names_lighting else [])
    return tuple(names)


def _swap_one(attrs: ds.Attributes, names: tuple[str, ...], rng) -> ds.Attributes:
    """The same attributes with exactly one named attribute changed (a hard negative); shape twice as often."""
    keys = [k for k in names for _ in range(2 if k == "shape" else 1)]
    key = keys[rng.integers(len(keys))]
    options = {"fg": [c for c in ds.COLORS if c not in (attrs.fg, attrs.bg)],
               "bg": [c for c in ds.COLORS if c not in (attrs.fg, attrs.bg)],
               "shape": [s for s in ds.SHAPES if s != attrs.shape],
               "texture": [t for t in ds.TEXTURES if t != attrs.texture],
               "lighting": [t for t in ds.LIGHTINGS if t != attrs.lighting]}[key]
    return ds.with_style(attrs, **{key: options[rng.integers(len(options))]})


def reward_caption(attrs: ds.Attributes, names: tuple[str, ...], rng) -> str:
    """A caption naming ``names``; style words as suffixes or as SRPO-style ``"<word>. "`` prefixes."""
    text = f"a {attrs.fg} {attrs.shape}" if "fg" in names else f"a {attrs.shape}"
    if "bg" in names:
        text += f" on a {attrs.bg} background"
    words = [getattr(attrs, k) for k in ("texture", "lighting") if k in names]
    if rng.random() < 0.5:
        return text + "".join(f", {w}" for w in words)
    rng.shuffle(words)
    return "".join(f"{w}. " for w in words) + text


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur and noise so the reward also reads imperfect (generated) images."""
    b = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(b, 1, 1, 1, generator=gen) * 0.5
    out = (1 - w) * images + w * blur
    out = out + torch.randn(out.shape, generator=gen) * 0.03 * torch.rand(b, 1, 1, 1, generator=gen)
    return out.clamp(0, 1)


def train_reward(steps: int, batch: int, seed: int):
    from ..rewards.clip import CLIP_MEAN, CLIP_STD, projected_features

    torch.manual_seed(seed)
    model, tok = arch.new_reward()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(CLIP_MEAN)[None, :, None, None]
    std = torch.tensor(CLIP_STD)[None, :, None, None]
    t0 = time.time()
    for step in range(steps):
        lr = _cosine_lr(step, steps, 1e-3, 200)
        for g in opt.param_groups:
            g["lr"] = lr
        # All 120 combinations: the reward plays a broadly trained preference model (like HPSv2 for FLUX). Trained on
        # the generator's 96 only, its vision tower read shapes of unseen colour pairs poorly (held-out one-attribute
        # retrieval 0.71, all misses on shape); the generator never sees the 24 held-out combinations either way.
        examples = ds.sample_examples(batch, seed=seed * 7919 + step, split="all")
        images = augment(ds.render_batch(examples), gen)
        names = [_reward_names(e.names_texture, e.names_lighting, rng) for e in examples]
        pos = [reward_caption(e.attrs, n, rng) for e, n in zip(examples, names)]
        neg = [reward_caption(_swap_one(e.attrs, n, rng), n, rng) for e, n in zip(examples, names)]
        text_in = tok(pos + neg, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt")
        img_emb = F.normalize(projected_features(model.get_image_features(pixel_values=(images - mean) / std)), dim=-1)
        txt_emb = F.normalize(projected_features(model.get_text_features(input_ids=text_in.input_ids)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img_emb @ txt_emb.T  # (B, 2B): columns B.. are hard negatives
        target = torch.arange(batch)
        # Captions that omit a style word also fit other images of the batch: mask exact duplicates of the positive.
        dup = torch.tensor([[pos[i] == pos[j] and i != j for j in range(batch)] for i in range(batch)])
        logits_i = logits.clone()
        logits_i[:, :batch] = logits_i[:, :batch].masked_fill(dup, -1e4)
        loss = (F.cross_entropy(logits_i, target) + F.cross_entropy(logits[:, :batch].T.masked_fill(dup, -1e4),
                                                                     target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log("reward", step=step, loss=loss.item(), scale=scale.item(), secs=time.time() - t0)
    model.eval().requires_grad_(False)
    LOG["reward"] = dict(steps=steps, batch=batch, seconds=time.time() - t0)
    return model, tok


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

    if "vae" in stages:  # first, on every thread; the reward starts after it, so no stage shares a core by chance
        train_vae(args.vae_steps, 32, args.seed).save_pretrained(work / "vae")
        save_log()

    reward_proc = None
    if args.parallel and "reward" in stages and stages & {"generator", "distill"} and args.threads >= 2:
        reward_log = work / "reward_log.json"
        reward_log.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "directalign.world.build", "--out", str(out), "--stages", "reward",
               "--threads", "1", "--seed", str(args.seed), "--reward-steps", str(args.reward_steps),
               "--log-file", str(reward_log), "--no-parallel"]
        reward_proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
        stages = stages - {"reward"}
        torch.set_num_threads(args.threads - 1)
    if "generator" in stages:
        vae = AutoencoderKL.from_pretrained(work / "vae").eval().requires_grad_(False)
        comps = train_generator(vae, args.generator_steps, 64, args.seed, args.n_data, args.eval_every)
        _pipeline(comps).save_pretrained(work / "teacher")
        save_log()
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
    if "reward" in stages:
        model, tok = train_reward(args.reward_steps, 128, args.seed)
        model.save_pretrained(out / "reward")
        tok.save_pretrained(out / "reward")
        save_log()
    if reward_proc is not None:
        if reward_proc.wait() != 0:
            raise SystemExit(f"the reward stage failed (exit {reward_proc.returncode}); its output is above")
        LOG["reward"] = json.loads(reward_log.read_text())["reward"]
    if args.log_file is None:
        LOG["total_seconds"] = time.time() - t_start
        save_log()


if __name__ == "__main__":
    main()
