"""Qwen-Image adapter (``QwenImagePipeline``: one Qwen2.5-VL text encoder, a 3D causal VAE, packed latents).

* Latents live in the pipeline's packed layout (B, (h/2)*(w/2), 4*C) with ``h, w = H / vae_scale_factor``, the same
  2x2 packing as FLUX. The VAE works on video tensors (B, C, T, H, W); images are one frame (T = 1).
* The VAE normalises latents per channel with ``latents_mean`` / ``latents_std`` from its config (never hard-coded):
  ``z_model = (z_vae - mean) / std``.
* The transformer takes ``timestep = sigma`` (the pipeline passes ``scheduler.timesteps / 1000``) and no pooled
  vector; text tokens come with a padding mask, since prompts of one batch have different lengths.
* Qwen-Image has no guidance embedding. ``guidance > 1`` runs true classifier-free guidance against
  ``negative_prompt`` exactly as ``QwenImagePipeline`` does: two transformer passes and the norm rescale
  ``v = v_cfg * |v_cond| / |v_cfg|`` (per token, over channels). The official SRPO Qwen code rolls out with true
  CFG 4.0 and trains with ``train_cfg = 1`` (no CFG in the differentiable step).
* Prompt embeddings are cached per prompt (unpadded) and padded per batch, with the mask, in ``encode_prompts``.
  ``set_prompt_embeds`` accepts precomputed embeddings, so a run can proceed with the text encoder never loaded
  (both from :class:`.prompt_cache.MaskedPromptCache`, shared with Z-Image).

Differences from the official SRPO Qwen code (srpo-method-notes 2.6): ``decode`` clamps to [0, 1] as the pipeline's
postprocessing does; the official code min-max normalises each image instead.
"""

from __future__ import annotations

import torch

from .base import PipelineAdapter
from .prompt_cache import MaskedPromptCache, MaskedPromptEmbeds


class QwenImageAdapter(MaskedPromptCache, PipelineAdapter):
    family = "qwen-image"
    pipeline_class = "QwenImagePipeline"
    # Joint attention and both streams' feed-forward layers of every QwenImageTransformerBlock.
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                           "txt_mlp.net.2")

    def __init__(self, pipe, max_sequence_length: int | None = None, negative_prompt: str = " "):
        self._attach(pipe, ("vae", "text_encoder"))
        self.max_sequence_length = max_sequence_length or 512  # QwenImagePipeline.__call__'s default
        self.negative_prompt = negative_prompt
        self._cache: dict[str, MaskedPromptEmbeds] = {}
        self.decode_checkpointing = False

    # ---------------------------------------------------------------------------------------------- text
    def _encode_unpadded(self, prompts: list[str]) -> list[torch.Tensor]:
        """``QwenImagePipeline.encode_prompt`` (its template and Qwen2.5-VL encoder), cut to each prompt's mask."""
        tokens, mask = self.pipe.encode_prompt(prompts, device=self.device,
                                               max_sequence_length=self.max_sequence_length)
        lengths = [int(m.sum()) for m in mask] if mask is not None else [tokens.shape[1]] * len(prompts)
        return [tokens[i : i + 1, :n] for i, n in enumerate(lengths)]

    # ---------------------------------------------------------------------------------------------- latents
    def _channels(self) -> int:
        return self.transformer.config.in_channels // 4

    def noise(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise in the packed layout, drawn in the unpacked (B, 1, C, h, w) layout as the pipeline does."""
        h, w = self.latent_hw(height, width)
        c = self._channels()
        z = torch.randn((batch, c, h, w), generator=generator, device=generator.device, dtype=torch.float32)
        return self.pipe._pack_latents(z.to(self.device, self.dtype), batch, c, h, w)

    def _forward(self, x, sigma, embeds: MaskedPromptEmbeds, height: int, width: int) -> torch.Tensor:
        b = x.shape[0]
        h, w = self.latent_hw(height, width)
        mask = embeds.mask.to(x.device)
        return self.transformer(
            hidden_states=x,
            timestep=sigma.to(x.dtype).expand(b),
            guidance=None,
            encoder_hidden_states=embeds.tokens.to(x.device, x.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, h // 2, w // 2)]] * b,
            return_dict=False,
        )[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: MaskedPromptEmbeds, guidance: float | None,
                 height: int, width: int) -> torch.Tensor:
        v = self._forward(x, sigma, embeds, height, width)
        if guidance is None or guidance <= 1.0:
            return v
        neg = self.encode_prompts([self.negative_prompt] * x.shape[0])
        v_neg = self._forward(x, sigma, neg, height, width)
        comb = v_neg + guidance * (v - v_neg)
        return comb * (torch.norm(v, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(shape)
        std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(shape)
        return mean, std

    def enable_vae_checkpointing(self) -> None:
        """Recompute the whole VAE decode in the backward pass instead of keeping its activations.
        ``AutoencoderKLQwenImage`` does not support diffusers' ``enable_gradient_checkpointing`` (diffusers 0.42),
        so ``train.vae_checkpointing`` cannot reach it; this is the adapter-level equivalent."""
        self.decode_checkpointing = True

    def _decode_z(self, z: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(z)
        return self.vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> images (B, 3, H, W) in [0, 1], differentiable (the VAE itself is frozen)."""
        z = self.pipe._unpack_latents(x, height, width, self.vae_scale_factor).to(self.vae.dtype)
        if self.decode_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            image = checkpoint(self._decode_z, z, use_reentrant=False)
        else:
            image = self._decode_z(z)
        return (image / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> packed, normalised latents (the VAE posterior mean)."""
        pixels = (images * 2 - 1).to(self.device, self.vae.dtype)[:, :, None]
        z = self.vae.encode(pixels).latent_dist.mean
        mean, std = self._latent_stats(z)
        z = ((z - mean) / std)[:, :, 0]
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z.to(self.dtype), b, c, h, w)
