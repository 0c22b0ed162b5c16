"""Z-Image adapter (``ZImagePipeline``: a single-stream DiT, a Qwen3 text encoder, FLUX-style 16-channel latents).

What ``ZImagePipeline.__call__`` (diffusers 0.42.1, pipelines/z_image/pipeline_z_image.py) does, and this adapter
reproduces:

* Latents are unpacked (B, C, H / f, W / f) with ``f`` the VAE factor, drawn in float32 (``prepare_latents``).
  ``ZImageTransformer2DModel`` takes a *list* of per-sample (C, 1, h, w) tensors (a frame axis of length 1) and a
  list of per-sample caption embeddings of their own lengths (the Qwen3 encoder's second-to-last hidden state of the
  real tokens of the chat-templated prompt, ``_encode_prompt``); it returns a list of (C, 1, h, w) outputs.
* Timestep convention: the model is conditioned on ``t = (1000 - timestep) / 1000 = 1 - sigma`` (0 = noise,
  1 = data; it multiplies by ``t_scale`` = 1000 itself) and predicts ``-v``: the pipeline steps the scheduler with
  ``-model_out``. So in diffusers' convention (sigma = 1 noise, sigma = 0 data) ``v = -model(x, 1 - sigma)``.
* Classifier-free guidance. The pipeline's ``guidance_scale`` ``g`` gives ``pos + g * (pos - neg)`` (CFG is on when
  ``g > 0``; the Turbo model runs ``g = 0``). This adapter's ``guidance`` ``w`` is the usual scale of every other
  family, ``v = neg + w * (pos - neg)``, so ``w = g + 1``: ``guidance <= 1`` is one conditional pass, and the
  pipeline's ``guidance_scale=4`` (Z-Image's published setting) is ``guidance: 5.0`` here. As the pipeline does, the
  positive and negative passes run as one batch against ``negative_prompt`` (the pipeline's default: the empty
  prompt), in float32, and two options follow the pipeline's arguments exactly:
  ``cfg_normalization`` (``c > 0``: the guided prediction's norm over the whole sample is capped at ``c`` times the
  conditional one's) and ``cfg_truncation`` (no guidance, and no normalisation, where ``1 - sigma > cfg_truncation``;
  the default 1.0 never truncates).
* Decoding: ``z / scaling_factor + shift_factor`` through the VAE, then ``(image / 2 + 0.5).clamp(0, 1)``; heights and
  widths must be multiples of ``2 * f`` (2x2 patches).

The rollout (``methods.sampling.rollout``) equals ``ZImagePipeline(latents=noise, num_inference_steps=N,
sigmas=linspace(1, 1/N, N), guidance_scale=w - 1)`` for the published static-shift schedulers (Z-Image: shift 6,
Z-Image-Turbo: shift 3; ``sigmas`` is also the pipeline's own default grid). Tested on a tiny random pipeline in
``tests/adapters/test_adapter_z_image.py``.
"""

from __future__ import annotations

import torch

from .base import PipelineAdapter
from .prompt_cache import MaskedPromptCache, MaskedPromptEmbeds


def z_image_timestep(sigma: torch.Tensor) -> torch.Tensor:
    """The transformer's time input for diffusers' sigma: ``(1000 - 1000 sigma) / 1000`` (= 1 - sigma), computed as
    the pipeline computes it from ``scheduler.timesteps = 1000 sigma``."""
    return (1000 - sigma * 1000) / 1000


def guided_velocity(pos: torch.Tensor, neg: torch.Tensor, guidance: float, normalization: float = 0.0) -> torch.Tensor:
    """Z-Image's CFG on per-sample predictions (B, ...): ``pred = pos + (w - 1) (pos - neg)``, and with
    ``normalization = c > 0`` the per-sample rescale ``pred * min(1, c |pos| / |pred|)`` (norms over each whole
    sample), as ``ZImagePipeline`` does; differentiable."""
    pred = pos + (guidance - 1.0) * (pos - neg)
    if normalization and normalization > 0:
        dims = tuple(range(1, pos.ndim))
        cap = torch.linalg.vector_norm(pos, dim=dims, keepdim=True) * float(normalization)
        norm = torch.linalg.vector_norm(pred, dim=dims, keepdim=True)
        pred = pred * torch.clamp(cap / norm, max=1.0)
    return pred


class ZImageAdapter(MaskedPromptCache, PipelineAdapter):
    family = "z-image"
    pipeline_class = "ZImagePipeline"
    # Attention (q, k, v, out) and the SwiGLU feed-forward of every ZImageTransformerBlock: the main ``layers``, the
    # image ``noise_refiner`` and the caption ``context_refiner``.
    lora_target_modules = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
                           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
    # the transformer's ModuleLists of ZImageTransformerBlock: FSDP2 shards each block as its own unit
    fsdp_block_names = ("noise_refiner", "context_refiner", "layers")

    def __init__(self, pipe, max_sequence_length: int | None = None, negative_prompt: str = "",
                 cfg_normalization: float = 0.0, cfg_truncation: float = 1.0):
        self._attach(pipe, ("vae", "text_encoder"))
        self.max_sequence_length = max_sequence_length or 512  # ZImagePipeline.__call__'s default
        self.negative_prompt = negative_prompt  # the pipeline's default negative prompt for CFG
        self.cfg_normalization = cfg_normalization  # ZImagePipeline's cfg_normalization (False = 0: off)
        self.cfg_truncation = cfg_truncation  # ZImagePipeline's cfg_truncation (1.0: never truncates)
        self._cache: dict[str, MaskedPromptEmbeds] = {}

    # ---------------------------------------------------------------------------------------------- text
    def _encode_unpadded(self, prompts: list[str]) -> list[torch.Tensor]:
        """``ZImagePipeline._encode_prompt`` (its chat template and Qwen3 encoder): the real tokens of each prompt.
        Prompt embeddings are cached per prompt string and padded per batch by :class:`MaskedPromptCache`."""
        # _encode_prompt templates its argument in place: hand it a copy
        embeds = self.pipe._encode_prompt(list(prompts), device=self.device,
                                          max_sequence_length=self.max_sequence_length)
        return [t[None] for t in embeds]

    # ---------------------------------------------------------------------------------------------- latents
    def noise(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise (B, C, h, w), drawn in float32 as ``ZImagePipeline.prepare_latents`` draws it."""
        h, w = self.latent_hw(height, width)
        c = self.transformer.config.in_channels
        z = torch.randn((batch, c, h, w), generator=generator, device=generator.device, dtype=torch.float32)
        return z.to(self.device, self.dtype)

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, embeds: MaskedPromptEmbeds) -> torch.Tensor:
        """The transformer's raw output (B, C, h, w) in float32 for latents (B, C, h, w) at sigma (B,)."""
        dtype = self.transformer.dtype
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))
        mask = embeds.mask.to(x.device).bool()
        caps = [embeds.tokens[i].to(x.device, dtype)[mask[i]] for i in range(x.shape[0])]
        t = z_image_timestep(sigma.to(x.device, torch.float32).expand(x.shape[0]))
        out = self.transformer(latents, t, caps, return_dict=False)[0]
        return torch.stack([o.float() for o in out]).squeeze(2)

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: MaskedPromptEmbeds, guidance: float | None,
                 height: int, width: int) -> torch.Tensor:
        b = x.shape[0]
        sigma = sigma.to(x.device).expand(b)
        active = torch.ones(b, dtype=torch.bool, device=x.device)
        if self.cfg_truncation is not None and float(self.cfg_truncation) <= 1:
            active = (1000 - sigma.float() * 1000) / 1000 <= float(self.cfg_truncation)
        if guidance is None or guidance <= 1.0 or not bool(active.any()):
            return -self._forward(x, sigma, embeds).to(x.dtype)
        neg = self.encode_prompts([self.negative_prompt] * b)
        both = self._forward(torch.cat([x, x]), torch.cat([sigma, sigma]), MaskedPromptEmbeds.cat([embeds, neg]))
        pos, neg_out = both[:b], both[b:]
        pred = guided_velocity(pos, neg_out, guidance, self.cfg_normalization)
        pred = torch.where(active.view(b, *([1] * (x.ndim - 1))), pred, pos)
        return (-pred).to(x.dtype)

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], differentiable (the VAE itself is frozen)."""
        cfg = self.vae.config
        z = x.to(self.vae.dtype) / cfg.scaling_factor + cfg.shift_factor
        return (self.vae.decode(z, return_dict=False)[0] / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> latents (the VAE posterior mean, shifted and scaled)."""
        cfg = self.vae.config
        z = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.mean
        return ((z - cfg.shift_factor) * cfg.scaling_factor).to(self.dtype)
