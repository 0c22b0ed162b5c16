"""FLUX.2 adapters: ``Flux2Pipeline`` (FLUX.2-dev: Mistral-Small-3.1 text encoder, guidance embedding) and
``Flux2KleinPipeline`` (FLUX.2-klein: Qwen3 text encoder, no guidance embedding, true classifier-free guidance).

What the code here reproduces, read from diffusers 0.42.1 ``pipelines/flux2/pipeline_flux2.py``,
``pipeline_flux2_klein.py``, ``models/transformers/transformer_flux2.py`` and
``models/autoencoders/autoencoder_kl_flux2.py``:

* Latents. The VAE's latents ``(B, C, h, w)`` (``h = H / vae_scale_factor``) are patchified 2x2 into channels,
  ``(B, 4C, h/2, w/2)``, and packed to tokens ``(B, (h/2)(w/2), 4C)`` in raster order. The pipeline draws its noise
  directly in the patchified layout (``prepare_latents``), so :meth:`Flux2Adapter.noise` does too.
* Position ids have four axes ``(t, h, w, l)``: image tokens ``(0, i, j, 0)``, text tokens ``(0, 0, 0, l)``.
* VAE normalisation uses the VAE's batch-norm running statistics over the patchified channels (not a scale / shift
  factor): ``z_model = (patchify(z_vae) - running_mean) / sqrt(running_var + batch_norm_eps)``.
* The transformer takes ``timestep = sigma`` (the pipeline passes ``scheduler.timesteps / 1000``) and multiplies by
  1000 inside; FLUX.2-dev's guidance embedding gets the guidance scale the same way (x1000 inside).
* Prompts are padded to ``max_sequence_length`` and the transformer attends to the padding (there is no text mask):
  the prompt embedding is three hidden-state layers of the text encoder stacked along channels, as the pipeline does.
* Klein's guidance is true CFG against the empty prompt (two passes, ``v_neg + g (v - v_neg)``), skipped for
  step-distilled checkpoints (``is_distilled`` in the pipeline config), exactly as ``Flux2KleinPipeline`` does.
* The schedule is dynamic: the pipeline shifts ``linspace(1, 1/N, N)`` with the exponential time shift at
  ``mu = compute_empirical_mu(image_seq_len, N)`` (black-forest-labs/flux2@5a5d316 src/flux2/sampling.py). The
  exponential shift ``e^mu / (e^mu + 1/t - 1)`` is the static shift ``s t / (1 + (s - 1) t)`` with ``s = e^mu``, so
  :func:`dynamic_shift` gives the ``sampling.shift`` that reproduces the pipeline at one resolution and step count.
"""

from __future__ import annotations

import math

import torch

from .base import PipelineAdapter, PromptEmbeds


def dynamic_shift(height: int, width: int, steps: int, vae_scale_factor: int = 8) -> float:
    """The static shift ``e^mu`` equal to FLUX.2's dynamic schedule for ``height x width`` images sampled in
    ``steps`` steps: ``mu = compute_empirical_mu((H / 2f) * (W / 2f), steps)`` as both FLUX.2 pipelines compute it."""
    from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

    seq_len = (height // (2 * vae_scale_factor)) * (width // (2 * vae_scale_factor))
    return math.exp(compute_empirical_mu(image_seq_len=seq_len, num_steps=steps))


def pack(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) -> (B, h * w, C)`` in raster order (``Flux2Pipeline._pack_latents``)."""
    b, c, h, w = z.shape
    return z.reshape(b, c, h * w).permute(0, 2, 1)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of :func:`pack`: ``(B, h * w, C) -> (B, C, h, w)`` (what the pipeline's id scatter gives for
    raster-order ids)."""
    b, _, c = x.shape
    return x.permute(0, 2, 1).reshape(b, c, h, w)


def image_ids(h: int, w: int, device=None) -> torch.Tensor:
    """Position ids ``(h * w, 4)`` of packed image tokens: ``(t=0, i, j, l=0)`` in raster order."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.arange(1)).to(device)


def text_ids(length: int, device=None) -> torch.Tensor:
    """Position ids ``(L, 4)`` of text tokens: ``(0, 0, 0, l)``."""
    return torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(length)).to(device)


class Flux2Adapter(PipelineAdapter):
    family = "flux2"
    pipeline_class = "Flux2Pipeline"
    # Every linear layer of both block kinds: the double-stream blocks' joint attention (image and text projections)
    # and both SwiGLU feed-forwards, and the single-stream blocks' fused QKV + MLP-in projection; their fused output
    # projections follow in lora_target_modules.
    _block_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                      "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out",
                      "to_qkv_mlp_proj")
    # FSDP2 units: the transformer's block lists (engine/distributed.shard_full_model wraps each block of these)
    fsdp_block_names = ("transformer_blocks", "single_transformer_blocks")
    default_guidance = 4.0  # Flux2Pipeline.__call__'s guidance_scale

    def __init__(self, pipe, max_sequence_length: int | None = None):
        self._attach(pipe, ("vae", "text_encoder"))
        self.max_sequence_length = max_sequence_length or pipe.tokenizer_max_length  # 512, the pipelines' default
        self._cache: dict[str, PromptEmbeds] = {}

    @property
    def lora_target_modules(self) -> tuple[str, ...]:
        """The block targets plus each single-stream block's ``attn.to_out`` by full name: the suffix ``attn.to_out``
        alone would also match the double-stream blocks' ``to_out`` ModuleList, which peft cannot wrap (diffusers'
        examples/dreambooth/train_dreambooth_lora_flux2_klein.py enumerates them the same way)."""
        n = len(self.transformer.single_transformer_blocks)
        return self._block_targets + tuple(f"single_transformer_blocks.{i}.attn.to_out" for i in range(n))

    @property
    def has_guidance_embedding(self) -> bool:
        return bool(self.transformer.config.guidance_embeds)

    def schedule_shift(self, height: int, width: int, steps: int) -> float:
        """The ``sampling.shift`` at which the rollout equals this pipeline's own sampler for these settings: the
        dynamic shift (:func:`dynamic_shift`) when the scheduler uses it, else the scheduler's static shift."""
        cfg = self.pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return float(cfg.shift)
        return dynamic_shift(height, width, steps, self.vae_scale_factor)

    # ---------------------------------------------------------------------------------------------- text
    def _encode(self, prompts: list[str]) -> torch.Tensor:
        tokens, _ = self.pipe.encode_prompt(prompts, device=self.device, max_sequence_length=self.max_sequence_length)
        return tokens

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> PromptEmbeds:
        """Prompt embeddings ``(B, max_sequence_length, 3 D)`` through the pipeline's own template, encoder and layer
        stack, cached per prompt string. FLUX.2 has no pooled vector (``pooled`` is ``(B, 0)``)."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            tokens = self._encode(missing)
            for i, p in enumerate(missing):
                t = tokens[i : i + 1]
                self._cache[p] = PromptEmbeds(t, t.new_zeros((1, 0)))
        return PromptEmbeds.cat([self._cache[p] for p in prompts])

    def unload_text_encoders(self) -> None:
        """Move the text encoder off the accelerator once every prompt the run needs is cached."""
        if self.pipe.text_encoder is not None:
            self.pipe.text_encoder.cpu()

    # ---------------------------------------------------------------------------------------------- latents
    def _channels(self) -> int:
        """Channels of the packed tokens (the VAE's latent channels x 4)."""
        return self.transformer.config.in_channels

    def noise(self, batch: int, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
        """Gaussian noise in the packed layout, drawn in the patchified ``(B, 4C, h/2, w/2)`` layout as
        ``Flux2Pipeline.prepare_latents`` draws it."""
        h, w = self.latent_hw(height, width)
        z = torch.randn((batch, self._channels(), h // 2, w // 2), generator=generator, device=generator.device,
                        dtype=torch.float32)
        return pack(z.to(self.device, self.dtype))

    def _forward(self, x: torch.Tensor, sigma: torch.Tensor, tokens: torch.Tensor, guidance: torch.Tensor | None,
                 height: int, width: int) -> torch.Tensor:
        h, w = self.latent_hw(height, width)
        return self.transformer(
            hidden_states=x,
            timestep=sigma.to(x.dtype).expand(x.shape[0]),
            guidance=guidance,
            encoder_hidden_states=tokens.to(x.device, x.dtype),
            txt_ids=text_ids(tokens.shape[1], x.device),
            img_ids=image_ids(h // 2, w // 2, x.device),
            return_dict=False,
        )[0]

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds, guidance: float | None,
                 height: int, width: int) -> torch.Tensor:
        """The flow velocity at ``x`` (packed) and ``sigma`` (B,), differentiable; the guidance scale goes to the
        guidance embedding (FLUX.2-dev is guidance-distilled: one pass)."""
        g = None
        if self.has_guidance_embedding:
            scale = self.default_guidance if guidance is None else float(guidance)
            g = torch.full((x.shape[0],), scale, device=x.device, dtype=torch.float32)
        return self._forward(x, sigma, embeds.tokens, g, height, width)

    # ---------------------------------------------------------------------------------------------- VAE
    def _bn_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(like.device,
                                                                                               like.dtype)
        return mean, std

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Packed latents -> images (B, 3, H, W) in [0, 1], differentiable (the VAE itself is frozen)."""
        h, w = self.latent_hw(height, width)
        z = unpack(x, h // 2, w // 2)
        mean, std = self._bn_stats(z)
        z = self.pipe._unpatchify_latents(z * std + mean)
        image = self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> packed, normalised latents (the VAE posterior mode, as ``_encode_vae_image``)."""
        z = self.vae.encode((images * 2 - 1).to(self.device, self.vae.dtype)).latent_dist.mode()
        z = self.pipe._patchify_latents(z)
        mean, std = self._bn_stats(z)
        return pack(((z - mean) / std).to(self.dtype))


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2-klein (base and step-distilled): Qwen3 text encoder, no guidance embedding; ``guidance > 1`` runs true
    CFG against the empty prompt unless the checkpoint is step-distilled (``Flux2KleinPipeline``'s rule)."""

    family = "flux2-klein"
    pipeline_class = "Flux2KleinPipeline"
    negative_prompt = ""  # hard-coded in Flux2KleinPipeline.__call__

    @property
    def has_guidance_embedding(self) -> bool:
        return False

    @property
    def is_distilled(self) -> bool:
        return bool(self.pipe.config.get("is_distilled", False))

    def velocity(self, x: torch.Tensor, sigma: torch.Tensor, embeds: PromptEmbeds, guidance: float | None,
                 height: int, width: int) -> torch.Tensor:
        v = self._forward(x, sigma, embeds.tokens, None, height, width)
        if guidance is None or guidance <= 1.0 or self.is_distilled:
            return v
        neg = self.encode_prompts([self.negative_prompt] * x.shape[0])
        v_neg = self._forward(x, sigma, neg.tokens, None, height, width)
        return v_neg + guidance * (v - v_neg)
