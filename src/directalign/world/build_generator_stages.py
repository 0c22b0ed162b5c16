"""The world build's image stages: the VAE, the generator (transformer and both text encoders, rectified flow) and
its guidance distillation, plus the generator evaluation they log. ``directalign.world.build`` runs them."""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import architecture as arch
from . import dataset as ds
from .build_common import LOG, _cosine_lr, _ema_update, _log


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
