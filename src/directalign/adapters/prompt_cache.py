"""Masked prompt embeddings and the per-prompt cache of the families whose text tokens carry a padding mask.

Qwen-Image and Z-Image both encode each prompt to its real (unpadded) tokens, cache them per prompt string, pad a
batch to its longest prompt with a mask, and accept precomputed embeddings so a run can proceed with the text encoder
never loaded. :class:`MaskedPromptCache` is that shared part; each family supplies only how its pipeline encodes a
list of prompts (``_encode_unpadded``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MaskedPromptEmbeds:
    """Text conditioning of a batch: token embeddings (B, L, D) and their padding mask (B, L), 1 = real token."""

    tokens: torch.Tensor
    mask: torch.Tensor

    def __getitem__(self, index) -> MaskedPromptEmbeds:
        return MaskedPromptEmbeds(self.tokens[index], self.mask[index])

    @staticmethod
    def cat(items: list[MaskedPromptEmbeds]) -> MaskedPromptEmbeds:
        """Concatenate along the batch, right-padding every item to the longest sequence (mask 0 on padding)."""
        length = max(e.tokens.shape[1] for e in items)

        def pad(t, value=0):
            extra = length - t.shape[1]
            if not extra:
                return t
            shape = (t.shape[0], extra, *t.shape[2:])
            return torch.cat([t, t.new_full(shape, value)], dim=1)

        return MaskedPromptEmbeds(torch.cat([pad(e.tokens) for e in items]), torch.cat([pad(e.mask) for e in items]))

    def to(self, *args, **kwargs) -> MaskedPromptEmbeds:
        tokens = self.tokens.to(*args, **kwargs)
        return MaskedPromptEmbeds(tokens, self.mask.to(tokens.device))


def unmasked(tokens: torch.Tensor) -> MaskedPromptEmbeds:
    """One prompt's real tokens (1, L, D) with an all-ones mask (1, L) on their device."""
    return MaskedPromptEmbeds(tokens, torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device))


class MaskedPromptCache:
    """``encode_prompts`` / ``set_prompt_embeds`` / ``unload_text_encoders`` over a per-prompt cache ``self._cache``
    of unpadded embeddings. The adapter sets ``self._cache = {}`` and ``self.pipe`` (with a ``text_encoder``), and
    implements ``_encode_unpadded``."""

    _cache: dict[str, MaskedPromptEmbeds]

    def _encode_unpadded(self, prompts: list[str]) -> list[torch.Tensor]:
        """Each prompt's real-token embeddings (1, L_i, D) through the pipeline's own template and text encoder."""
        raise NotImplementedError

    def set_prompt_embeds(self, embeds: dict[str, torch.Tensor]) -> None:
        """Precomputed embeddings ``{prompt: (L, D) or (1, L, D)}`` of the real tokens (unpadded; e.g. from
        ``pipe.encode_prompt`` on another machine). Prompts found here never touch the text encoder; include
        ``negative_prompt`` for CFG."""
        for prompt, t in embeds.items():
            self._cache[prompt] = unmasked(t if t.ndim == 3 else t[None])

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> MaskedPromptEmbeds:
        """Prompt embeddings through the pipeline's own template and encoder, cached per prompt string, padded to
        the batch's longest prompt with the mask."""
        missing = sorted({p for p in prompts if p not in self._cache})
        if missing:
            if self.pipe.text_encoder is None:
                raise RuntimeError(f"no text encoder loaded and no precomputed embeddings for {missing[0]!r}; "
                                   "call set_prompt_embeds first")
            for p, t in zip(missing, self._encode_unpadded(missing)):
                self._cache[p] = unmasked(t)
        return MaskedPromptEmbeds.cat([self._cache[p] for p in prompts])

    def unload_text_encoders(self) -> None:
        if self.pipe.text_encoder is not None:
            self.pipe.text_encoder.cpu()
