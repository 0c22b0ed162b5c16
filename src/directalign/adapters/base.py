"""The model-adapter interface: the only code that knows a model family's latents, text encoders and VAE.

Every method in :mod:`directalign.methods` talks to a generator through these calls:

* ``encode_prompts(prompts) -> PromptEmbeds`` (no grad, cached per prompt),
* ``noise(batch, height, width, generator) -> x`` in the transformer's latent layout,
* ``velocity(x, sigma, embeds, guidance) -> v`` (differentiable; sigma is (B,) in diffusers' convention),
* ``decode(x, height, width) -> images`` in [0, 1], differentiable through the VAE decoder,
* ``encode_images(images) -> x`` (offline mode: real images into the latent layout),
* ``trainable_module`` (what LoRA / full fine-tuning trains) and ``lora_target_modules``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch


def model_identity(family: str, module: torch.nn.Module, **extra) -> dict:
    """A stable description of a base model for resume checks: its config without paths or library versions, and a
    digest of three of its base (non-LoRA) weight tensors, so moving the folder or upgrading diffusers does not
    change it while different weights at the same path do."""
    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    base = [(n, p) for n, p in module.named_parameters() if "lora_" not in n]
    digest = hashlib.sha256()
    for name, p in (base[0], base[len(base) // 2], base[-1]) if base else ():
        digest.update(name.encode())
        digest.update(p.detach().float().cpu().numpy().tobytes())
    return {"family": family, "config": config, "weights": digest.hexdigest()[:16], **extra}


@dataclass
class PromptEmbeds:
    """Text conditioning of a batch: the token sequence (B, L, D) and the pooled vector (B, P)."""

    tokens: torch.Tensor
    pooled: torch.Tensor

    def __getitem__(self, index) -> "PromptEmbeds":
        return PromptEmbeds(self.tokens[index], self.pooled[index])

    @staticmethod
    def cat(items: list["PromptEmbeds"]) -> "PromptEmbeds":
        return PromptEmbeds(torch.cat([e.tokens for e in items]), torch.cat([e.pooled for e in items]))

    def to(self, *args, **kwargs) -> "PromptEmbeds":
        return PromptEmbeds(self.tokens.to(*args, **kwargs), self.pooled.to(*args, **kwargs))


class PipelineAdapter:
    """What every diffusers-pipeline adapter shares: loading, frozen non-trainable parts, component accessors and
    the resume identity. Subclasses set ``family``, ``pipeline_class`` (a diffusers pipeline class name) and
    ``lora_target_modules``, and implement the text, latent and decode calls."""

    family = ""
    pipeline_class = ""
    lora_target_modules: tuple[str, ...] = ()
    has_guidance_embedding = False

    def _attach(self, pipe, frozen: tuple[str, ...]) -> None:
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        for name in frozen:
            module = getattr(pipe, name, None)
            if module is not None:
                module.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        max_sequence_length: int | None = None, **kwargs):
        import diffusers

        from ..compat import dtype_kwargs

        pipeline = getattr(diffusers, cls.pipeline_class)
        pipe = pipeline.from_pretrained(path, **dtype_kwargs(dtype), **kwargs).to(device)
        return cls(pipe, max_sequence_length)

    @property
    def transformer(self):
        return self.pipe.transformer

    # The pipeline attribute holding ``transformer`` (a video family with two experts may train the second), and
    # what ``pipe.load_lora_weights`` needs to put an exported LoRA of it there.
    transformer_slot = "transformer"
    lora_load_kwargs: dict = {}

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    @property
    def vae_scale_factor(self) -> int:
        return self.pipe.vae_scale_factor

    @property
    def resolution_multiple(self) -> int:
        """Height and width must be multiples of this (VAE factor x 2x2 patches)."""
        return self.vae_scale_factor * 2

    def latent_hw(self, height: int, width: int) -> tuple[int, int]:
        """Latent height and width for an image size; refuses sizes the VAE and patching cannot tile."""
        m = self.resolution_multiple
        if height % m or width % m:
            raise ValueError(f"resolution {height}x{width} is not a multiple of {m} (VAE factor "
                             f"{self.vae_scale_factor} x 2x2 packing); use e.g. {height // m * m or m}")
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def identity(self) -> dict:
        """What makes checkpoints belong to this model (see :func:`model_identity`)."""
        return model_identity(self.family, self.transformer, max_sequence_length=self.max_sequence_length)
