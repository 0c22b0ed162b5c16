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

from dataclasses import dataclass

import torch


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
