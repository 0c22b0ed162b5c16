"""Stable Diffusion 3 / 3.5 adapter (three text encoders, unpacked latents, true classifier-free guidance).

Latents are (B, 16, H/8, W/8); the transformer takes the timestep in diffusers' 0..1000 scale (``sigma * 1000``),
as ``StableDiffusion3Pipeline`` passes ``scheduler.timesteps``. SD3 has no guidance embedding: ``guidance > 1``
runs true classifier-free guidance against the empty prompt (two transformer passes, as the pipeline does), in the
rollout and, when configured, in the differentiable step.

The rollout (``methods.sampling.rollout``) equals ``StableDiffusion3Pipeline(latents=noise, num_inference_steps=N,
sigmas=linspace(1, 1/N, N))`` for a static-shift scheduler (SD3 / SD3.5 ship shift 3.0); without ``sigmas`` the
pipeline spaces its timesteps slightly differently (``linspace(t_max, t_min, N)`` of the training grid).
Tested on a tiny random SD3.5-medium-shaped pipeline in ``tests/test_adapters_sd3_qwen.py``.
"""

from __future__ import annotations

import torch

from .base import PipelineAdapter, PromptEmbeds


class SD3Adapter(PipelineAdapter):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                           "to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")

    def __init__(self, pipe, max_sequence_length: int | None = None, negative_prompt: str = ""):
        self._attach(pipe, ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"))
        self.max_sequence_length = max_sequence_length or 256  # StableDiffusion3Pipeline.__call__'s default
        self.negative_prompt = negative_prompt  # the pipeline's default negative prompt for true CFG
        self._cache: dict[str, PromptEmbeds] = {}

    @property
    def resolution_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            tokens, _, pooled, _ = self.pipe.encode_prompt(missing, None, None, device=self.device,
                                                           do_classifier_free_guidance=False,
                                                           max_sequence_length=self.max_sequence_length)
            for i, p in enumerate(missing):
                self._cache[p] = PromptEmbeds(tokens[i : i + 1], pooled[i : i + 1])
        return PromptEmbeds.cat([self._cache[p] for p in prompts])

    def unload_text_encoders(self) -> None:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            module = getattr(self.pipe, name, None)
            if module is not None:
                module.cpu()

    def noise(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        h, w = self.latent_hw(height, width)
        c = self.transformer.config.in_channels
        z = torch.randn((batch, c, h, w), generator=generator, device=generator.device, dtype=torch.float32)
        return z.to(self.device, self.dtype)

    def _forward(self, x, sigma, tokens, pooled):
        return self.transformer(hidden_states=x, timestep=(sigma * 1000).to(x.dtype).expand(x.shape[0]),
                                encoder_hidden_states=tokens.to(x.dtype), pooled_projections=pooled.to(x.dtype),
                                return_dict=False)[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds, guidance: float | None,
                 height: int, width: int) -> torch.Tensor:
        if guidance is None or guidance <= 1.0:
            return self._forward(x, sigma, embeds.tokens, embeds.pooled)
        uncond = self.encode_prompts([self.negative_prompt] * x.shape[0])
        both = self._forward(torch.cat([x, x]), torch.cat([sigma.expand(x.shape[0])] * 2),
                             torch.cat([uncond.tokens, embeds.tokens]), torch.cat([uncond.pooled, embeds.pooled]))
        v_u, v_c = both.chunk(2)
        return v_u + guidance * (v_c - v_u)

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        cfg = self.vae.config
        z = x / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return (self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0] / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        cfg = self.vae.config
        z = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.mean
        return ((z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor).to(self.dtype)
