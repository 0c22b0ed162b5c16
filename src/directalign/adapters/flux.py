"""FLUX.1 adapter (dev, schnell, Krea, fine-tunes, and the tiny world, which has the same shape).

Latents live in FLUX's packed layout (B, (h/2)*(w/2), 4*C) with ``h, w = H / vae_scale_factor``; the VAE's scale and
shift are read from its config. ``velocity`` passes sigma as the transformer's timestep exactly as
``FluxPipeline`` does (it hands ``sigma * 1000 / 1000`` to the transformer, which multiplies by 1000 inside).
The guidance embedding is used when the transformer has one (FLUX.1-dev); otherwise guidance is ignored.
"""

from __future__ import annotations

import torch

from .base import PipelineAdapter, PromptEmbeds


class FluxAdapter(PipelineAdapter):
    family = "flux"
    pipeline_class = "FluxPipeline"
    # Attention and feed-forward projections of both block kinds; the usual FLUX LoRA targets.
    lora_target_modules = (
        "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
        "proj_mlp", "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    )

    def __init__(self, pipe, max_sequence_length: int | None = None):
        self._attach(pipe, ("vae", "text_encoder", "text_encoder_2"))
        self.max_sequence_length = max_sequence_length or min(512, pipe.tokenizer_2.model_max_length)
        self._cache: dict[str, PromptEmbeds] = {}
        self._ids_cache: dict[tuple, torch.Tensor] = {}

    @property
    def has_guidance_embedding(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    # ---------------------------------------------------------------------------------------------- text
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Prompt embeddings through the pipeline's own encoders, cached per prompt string."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            tokens, pooled, _ = self.pipe.encode_prompt(missing, prompt_2=None, device=self.device,
                                                        max_sequence_length=self.max_sequence_length)
            for i, p in enumerate(missing):
                self._cache[p] = PromptEmbeds(tokens[i : i + 1], pooled[i : i + 1])
        return PromptEmbeds.cat([self._cache[p] for p in prompts])

    def unload_text_encoders(self) -> None:
        """Move the text encoders off the accelerator once every prompt the run needs is cached."""
        self.pipe.text_encoder.cpu()
        self.pipe.text_encoder_2.cpu()

    # ---------------------------------------------------------------------------------------------- latents
    def _image_ids(self, height: int, width: int) -> torch.Tensor:
        """Positional ids of the packed image tokens; built once per size (every velocity call needs them)."""
        key = (height, width, self.device, self.dtype)
        if key not in self._ids_cache:
            h, w = self.latent_hw(height, width)
            self._ids_cache[key] = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)
        return self._ids_cache[key]

    def noise(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise in the packed layout, drawn in the unpacked layout as FluxPipeline does."""
        h, w = self.latent_hw(height, width)
        c = self.transformer.config.in_channels // 4
        z = torch.randn((batch, c, h, w), generator=generator, device=generator.device, dtype=torch.float32)
        return self.pipe._pack_latents(z.to(self.device, self.dtype), batch, c, h, w)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds, guidance: float | None,
                 height: int, width: int) -> torch.Tensor:
        b = x.shape[0]
        g = None
        if self.has_guidance_embedding:
            g = torch.full((b,), float(guidance if guidance is not None else 1.0), device=x.device,
                           dtype=torch.float32)
        txt_ids = torch.zeros(embeds.tokens.shape[1], 3, device=x.device, dtype=x.dtype)
        return self.transformer(
            hidden_states=x,
            timestep=sigma.to(x.dtype).expand(b),
            guidance=g,
            pooled_projections=embeds.pooled.to(x.dtype),
            encoder_hidden_states=embeds.tokens.to(x.dtype),
            txt_ids=txt_ids,
            img_ids=self._image_ids(height, width),
            return_dict=False,
        )[0]

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> images (B, 3, H, W) in [0, 1], differentiable (the VAE itself is frozen)."""
        z = self.pipe._unpack_latents(x, height, width, self.vae_scale_factor)
        cfg = self.vae.config
        z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> packed, normalised latents (the VAE posterior mean)."""
        cfg = self.vae.config
        z = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.mean
        z = (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor
        b, c, h, w = z.shape
        return self.pipe._pack_latents(z.to(self.dtype), b, c, h, w)
