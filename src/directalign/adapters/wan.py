"""Wan 2.1 / 2.2 text-to-video adapter (``WanPipeline``: UMT5 text encoder, ``WanTransformer3DModel``,
``AutoencoderKLWan``), following diffusers 0.42.1 ``pipelines/wan/pipeline_wan.py``.

* Latents have a time axis: (B, C, T, h, w) with ``T = (frames - 1) // vae.scale_factor_temporal + 1`` and
  ``h, w = H, W / vae.scale_factor_spatial``; the transformer patchifies them itself (patch (1, 2, 2)). The VAE is
  causal in time, so a video has ``frames = scale_factor_temporal * k + 1`` frames (4k + 1 for the published VAE);
  other counts are refused (the pipeline would round them with a warning).
* ``decode`` returns videos (B, F, 3, H, W) in [0, 1] (the pipeline's ``output_type="pt"`` layout); rewards score
  every frame and average (:mod:`directalign.rewards.video`). ``encode_images`` takes videos, or images (B, 3, H, W)
  as one-frame videos.
* The VAE normalises latents per channel with ``latents_mean`` / ``latents_std`` from its config, computed exactly
  as the pipeline does (``z_vae = z / (1 / std) + mean``).
* The transformer takes ``timestep = sigma * 1000`` (``scheduler.timesteps``); prompt embeddings are the UMT5 states
  of the real tokens, zero-padded to ``max_sequence_length`` (no attention mask), cached per prompt.
* ``guidance > 1`` is true classifier-free guidance against ``negative_prompt`` (the pipeline's default: empty),
  two transformer passes ``v_u + g (v_c - v_u)``, as the pipeline runs them.
* Wan 2.2 (``transformer_2`` and ``boundary_ratio`` in the pipeline): the high-noise expert ``transformer`` serves
  ``sigma * 1000 >= boundary_ratio * num_train_timesteps``, the low-noise expert ``transformer_2`` the rest; the
  low-noise expert uses ``guidance_2`` (the pipeline's ``guidance_scale_2``; None: the same guidance) whenever CFG is
  on. ``trainable_expert`` ("high" or "low", ``model.trainable_expert``) says which one is ``self.transformer``, the
  module LoRA / full fine-tuning trains and exports; the other stays frozen. Wan 2.1 has one transformer ("high").

The published checkpoints ship ``UniPCMultistepScheduler``; the rollout here is the Euler ODE over the shifted
schedule (``sampling.shift``), which equals ``WanPipeline`` with a ``FlowMatchEulerDiscreteScheduler`` of that shift
(tested in ``tests/adapters/test_adapter_wan.py``).
"""

from __future__ import annotations

import torch

from ..errors import UserError
from .base import PipelineAdapter, PromptEmbeds, model_identity

EXPERTS = ("high", "low")


class WanConfigError(UserError, ValueError):
    """A Wan setting the loaded pipeline cannot serve (frame count, trainable expert); one line with the fix."""


class WanAdapter(PipelineAdapter):
    family = "wan"
    pipeline_class = "WanPipeline"
    # self- and cross-attention projections and the feed-forward of every WanTransformerBlock
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2")
    fsdp_block_names = ("blocks",)  # WanTransformer3DModel's ModuleList of WanTransformerBlock (FSDP2 units)

    def __init__(self, pipe, max_sequence_length: int | None = None, negative_prompt: str = "", frames: int = 1,
                 trainable_expert: str = "high", guidance_2: float | None = None):
        self._attach(pipe, ("vae", "text_encoder"))
        self.max_sequence_length = max_sequence_length or min(512, pipe.tokenizer.model_max_length)
        self.negative_prompt = negative_prompt
        self._cache: dict[str, PromptEmbeds] = {}
        self.decode_checkpointing = False
        self.frames = 1
        self.trainable_expert = "high"
        self.guidance_2 = None
        self.set_frames(frames)
        self.set_trainable_expert(trainable_expert)
        self.set_guidance_2(guidance_2)

    def configure(self, model_cfg) -> WanAdapter:
        """Apply the ``model`` section's video fields: ``frames``, ``trainable_expert``, ``guidance_2`` (0: same)."""
        self.set_frames(model_cfg.frames)
        self.set_trainable_expert(model_cfg.trainable_expert)
        self.set_guidance_2(model_cfg.guidance_2 or None)
        return self

    def set_guidance_2(self, guidance_2: float | None) -> None:
        """The low-noise expert's CFG scale (None: the same as ``guidance``); Wan 2.2 only, as in the pipeline."""
        if guidance_2 is not None and not self.two_experts:
            raise WanConfigError(f"model.guidance_2={guidance_2} sets the CFG of Wan 2.2's low-noise expert; this "
                                 "pipeline has a single transformer: set model.guidance_2=0")
        self.guidance_2 = guidance_2

    # ---------------------------------------------------------------------------------------------- experts
    @property
    def two_experts(self) -> bool:
        return self.pipe.transformer_2 is not None and self.pipe.config.boundary_ratio is not None

    def set_trainable_expert(self, which: str) -> None:
        """Make ``which`` ("high" or "low") the trainable ``self.transformer``; freeze the other expert. Call before
        fine-tuning is applied."""
        if which not in EXPERTS:
            raise WanConfigError(f"model.trainable_expert={which!r}; choose from {', '.join(EXPERTS)}")
        if which == "low" and not self.two_experts:
            raise WanConfigError("model.trainable_expert=low needs a Wan 2.2 pipeline (transformer_2 and "
                                 "boundary_ratio); this one has a single transformer: set model.trainable_expert=high")
        self.trainable_expert = which
        if self.two_experts:
            frozen = self.pipe.transformer_2 if which == "high" else self.pipe.transformer
            frozen.requires_grad_(False).eval()

    @property
    def transformer(self):
        """The trainable expert (Wan 2.1: the only transformer)."""
        return self.pipe.transformer_2 if self.trainable_expert == "low" else self.pipe.transformer

    @property
    def transformer_slot(self) -> str:
        """The pipeline attribute holding the trainable expert (where a replacement transformer goes)."""
        return "transformer_2" if self.trainable_expert == "low" else "transformer"

    @property
    def frozen_expert(self):
        """The expert that does not train (None for Wan 2.1)."""
        if not self.two_experts:
            return None
        return self.pipe.transformer if self.trainable_expert == "low" else self.pipe.transformer_2

    @property
    def lora_load_kwargs(self) -> dict:
        """What ``WanPipeline.load_lora_weights`` needs to put an exported LoRA of the trainable expert where it
        belongs: ``load_into_transformer_2=True`` for the low-noise expert (the export's keys name "transformer")."""
        return {"load_into_transformer_2": True} if self.trainable_expert == "low" else {}

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    def expert_mask(self, sigma: torch.Tensor) -> torch.Tensor:
        """(B,) bool: True where the high-noise expert serves ``sigma`` (every row for Wan 2.1), the pipeline's
        ``t >= boundary_ratio * num_train_timesteps`` with ``t = sigma * 1000``."""
        t = self._timestep(sigma)
        if not self.two_experts:
            return torch.ones_like(t, dtype=torch.bool)
        return t >= self.pipe.config.boundary_ratio * self.pipe.scheduler.config.num_train_timesteps

    # ---------------------------------------------------------------------------------------------- geometry
    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor_spatial

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size[1]

    def set_frames(self, frames: int) -> None:
        """Frames per video; the causal VAE needs ``scale_factor_temporal * k + 1``."""
        f = self.pipe.vae_scale_factor_temporal
        if frames < 1 or (frames - 1) % f:
            near = max(1, round((frames - 1) / f) * f + 1)
            raise WanConfigError(f"model.frames={frames}: the Wan VAE needs {f}k + 1 frames; use e.g. {near}")
        self.frames = frames

    def latent_frames(self) -> int:
        return (self.frames - 1) // self.pipe.vae_scale_factor_temporal + 1

    # ---------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """UMT5 embeddings through the pipeline's own cleaning, tokenizer and zero padding, cached per prompt. The
        pooled vector is empty (Wan has none)."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            tokens, _ = self.pipe.encode_prompt(missing, do_classifier_free_guidance=False, device=self.device,
                                                max_sequence_length=self.max_sequence_length)
            for i, p in enumerate(missing):
                t = tokens[i : i + 1]
                self._cache[p] = PromptEmbeds(t, t.new_zeros((1, 0)))
        return PromptEmbeds.cat([self._cache[p] for p in prompts])

    def unload_text_encoders(self) -> None:
        self.pipe.text_encoder.cpu()

    # ---------------------------------------------------------------------------------------------- latents
    def noise(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian latents (B, C, T, h, w), one draw for the batch as ``WanPipeline.prepare_latents`` does."""
        h, w = self.latent_hw(height, width)
        c = self.transformer.config.in_channels
        z = torch.randn((batch, c, self.latent_frames(), h, w), generator=generator, device=generator.device,
                        dtype=torch.float32)
        return z.to(self.device, self.dtype)

    @staticmethod
    def _timestep(sigma: torch.Tensor) -> torch.Tensor:
        return sigma.float() * 1000

    def _forward(self, model, x, t, tokens) -> torch.Tensor:
        return model(hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=tokens.to(x.dtype),
                     return_dict=False)[0]

    def _expert_velocity(self, model, x, t, embeds: PromptEmbeds, guidance: float | None) -> torch.Tensor:
        v = self._forward(model, x, t, embeds.tokens)
        if guidance is None or guidance <= 1.0:
            return v
        g = guidance
        if model is self.pipe.transformer_2 and self.two_experts and self.guidance_2 is not None:
            g = self.guidance_2
        neg = self.encode_prompts([self.negative_prompt] * x.shape[0])
        v_neg = self._forward(model, x, t, neg.tokens.to(x.device))
        return v_neg + g * (v - v_neg)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds, guidance: float | None,
                 height: int, width: int) -> torch.Tensor:
        """The velocity of the expert that serves each row's sigma (rows on both sides of the boundary are split
        between the experts); CFG when ``guidance > 1``."""
        sigma = sigma.reshape(-1).expand(x.shape[0])
        t = self._timestep(sigma).to(x.device)
        high = self.expert_mask(sigma).to(x.device)
        embeds = embeds.to(x.device)
        if bool(high.all()) or not self.two_experts:
            return self._expert_velocity(self.pipe.transformer, x, t, embeds, guidance)
        if not bool(high.any()):
            return self._expert_velocity(self.pipe.transformer_2, x, t, embeds, guidance)
        out = torch.empty_like(x)
        for model, rows in ((self.pipe.transformer, high), (self.pipe.transformer_2, ~high)):
            idx = rows.nonzero().flatten()
            out = out.index_put((idx,), self._expert_velocity(model, x[idx], t[idx], embeds[idx], guidance))
        return out

    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std), shaped (1, C, 1, 1, 1), as the pipeline builds them."""
        cfg = self.vae.config
        shape = (1, cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(cfg.latents_mean).view(shape).to(like.device, like.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(shape).to(like.device, like.dtype)
        return mean, inv_std

    def enable_vae_checkpointing(self) -> None:
        """Recompute the whole VAE decode in the backward pass (``train.vae_checkpointing``), as for Qwen-Image."""
        self.decode_checkpointing = True

    def _decode_z(self, z: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self._latent_stats(z)
        return self.vae.decode(z / inv_std + mean, return_dict=False)[0]

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents (B, C, T, h, w) -> videos (B, F, 3, H, W) in [0, 1], differentiable (the VAE is frozen)."""
        z = x.to(self.vae.dtype)
        if self.decode_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            video = checkpoint(self._decode_z, z, use_reentrant=False)
        else:
            video = self._decode_z(z)
        return (video / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Videos (B, F, 3, H, W) or images (B, 3, H, W) (one-frame videos) in [0, 1] -> normalised latents (the
        VAE posterior mean), ``(z - mean) * (1 / std)`` as diffusers' Wan video-to-video pipeline encodes."""
        video = images[:, None] if images.ndim == 4 else images
        pixels = (video * 2 - 1).permute(0, 2, 1, 3, 4).to(self.device, self.vae.dtype)
        z = self.vae.encode(pixels).latent_dist.mean
        mean, inv_std = self._latent_stats(z)
        return ((z - mean) * inv_std).to(self.dtype)

    def identity(self) -> dict:
        return model_identity(self.family, self.transformer, max_sequence_length=self.max_sequence_length,
                              trainable_expert=self.trainable_expert, frames=self.frames,
                              boundary_ratio=self.pipe.config.boundary_ratio)
