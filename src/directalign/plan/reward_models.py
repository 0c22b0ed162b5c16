"""The reward model of a plan, built on the meta device, with the image-side call a training step makes.

Each scorer is an ``nn.Module`` holding the reward's real modules (so its parameters count) with a
``score(images)`` method: (N, 3, H, W) in [0, 1] -> (N,), differentiable in the images, which runs what the reward
runs on a step's decoded images (the text side of the CLIP-family rewards does not depend on the image and is cached
per prompt, so it costs nothing per step):

* CLIP rewards (``hpsv2``, ``pickscore``, the tiny world's): a transformers ``CLIPModel`` as
  :mod:`directalign.rewards.clip` runs it (:func:`directalign.plan.probes.reward_forward`); a bare ``CLIPModel`` is
  accepted as its own scorer;
* ``hpsv3`` (:class:`HPSv3Scorer`): transformers' ``Qwen2VLModel`` built from the published Qwen2-VL-7B-Instruct
  ``config.json`` plus the reward head, run as :class:`directalign.rewards.hpsv3.HPSv3Reward` does: the tensor
  preprocessing (``rewards/hpsv3.preprocess``), the vision tower once per image, then the language model over the
  chat turn (system text, the image's merged tokens, the instruction with the prompt, the ``<|Reward|>`` line) once
  per scored text (two for SRPO's relative forms: the positive and the negative control phrase), and the head at
  the reward token. The text lengths are counted without the tokenizer by Qwen2's pre-tokenizer split
  (:func:`text_tokens`);
* ``mps`` (:class:`MPSScorer`): the CLIP ViT-H/14 image tokens projected, then the published 4-layer fusion
  (``rewards/mps.MPSFusion``) against a prompt's 77 cached token features once per scored text.

The vision tower of Qwen2-VL reads its grid (``grid_thw``) as data; on meta tensors the grid, the per-image
attention boundaries and the rotary positions are computed on the CPU from the known image size and passed in, as
the model's own ``kwargs`` allow (transformers ``vision_utils.get_vision_position_ids`` / ``get_vision_cu_seqlens``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import probes
from .sources import build_meta

# Qwen2's pre-tokenizer split (Qwen/Qwen2-VL-7B-Instruct tokenizer.json "pre_tokenizer", the GPT-4 pattern): a BPE
# token never crosses a split, and common English words are single tokens of its 151k vocabulary, so the number of
# pieces is the token count of plain English text (a lower bound for rare words).
_PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_SPECIAL = r"<\|[a-z_A-Z]+\|>"
FALLBACK_PROMPT = "a photo of a red fox sitting in the snow at sunset, highly detailed, natural light"


def text_tokens(text: str) -> int:
    """Tokens of ``text`` under Qwen2's tokenizer, counted as its pre-tokenizer pieces (each special token
    ``<|...|>`` one token)."""
    import regex

    n = 0
    for i, part in enumerate(regex.split(f"({_SPECIAL})", text)):
        n += 1 if i % 2 else len(regex.findall(_PRETOKENIZE, part))
    return n


def typical_prompt(source: str) -> str:
    """The prompt of median length of the run's prompt set (``train.prompts``); a fixed example if unreadable."""
    try:
        from ..prompts import load_prompts

        prompts = sorted(load_prompts(source), key=len)
    except Exception:  # noqa: BLE001 - any unreadable set: the planner still answers
        return FALLBACK_PROMPT
    return prompts[len(prompts) // 2] if prompts else FALLBACK_PROMPT


class ClipScorer(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def score(self, images: torch.Tensor) -> torch.Tensor:
        return probes.reward_forward(self.model, images)


class HPSv3Scorer(nn.Module):
    """``model``: ``Qwen2VLModel``; ``head``: the published ``rm_head``; ``texts``: the prompts scored per image
    (SRPO: the control phrase + the prompt), each wrapped in the instruction of one chat turn
    (``rewards/hpsv3.chat_text``)."""

    def __init__(self, model, head: nn.Module, texts: list[str]):
        from ..rewards.hpsv3 import PIXELS

        super().__init__()
        self.model, self.head, self.texts = model, head, list(texts)
        self.pixels = PIXELS

    def token_layout(self, text: str, n_image: int) -> tuple[int, int]:
        """(tokens before the image tokens, tokens after them) of ``chat_text(text, n_image)``."""
        from ..rewards.hpsv3 import chat_text

        full = chat_text(text, n_image)
        before = full.split("<|image_pad|>", 1)[0]
        return text_tokens(before), text_tokens(full) - text_tokens(before) - n_image

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        from transformers.vision_utils import (
            get_vision_cu_seqlens,
            get_vision_position_ids,
        )

        from ..rewards.hpsv3 import preprocess, smart_resize

        visual = self.model.visual
        c = visual.config
        dtype = next(visual.parameters()).dtype
        patches, _ = preprocess(images.to(dtype), self.pixels, self.pixels, c.patch_size, c.spatial_merge_size,
                                c.temporal_patch_size)
        h, w = smart_resize(images.shape[-2], images.shape[-1], c.patch_size * c.spatial_merge_size, self.pixels,
                            self.pixels)
        grid = torch.tensor([[1, h // c.patch_size, w // c.patch_size]] * images.shape[0])  # CPU: read as data
        positions = get_vision_position_ids(grid, c.spatial_merge_size).to(patches.device)
        out = visual(patches, grid_thw=grid, position_ids=positions, cu_seqlens=get_vision_cu_seqlens(grid))
        tokens = getattr(out, "pooler_output", out)
        return tokens.reshape(images.shape[0], -1, tokens.shape[-1])

    def score(self, images: torch.Tensor) -> torch.Tensor:
        state = self.encode(images)
        b, n, _ = state.shape
        lm = self.model.language_model
        total = 0
        for text in self.texts:
            before, after = self.token_layout(text, n)
            ids = torch.zeros(b, before + after, dtype=torch.long, device=state.device)
            embeds = lm.embed_tokens(ids)
            embeds = torch.cat([embeds[:, :before], state.to(embeds.dtype), embeds[:, before:]], 1)
            positions = torch.arange(embeds.shape[1], device=state.device).view(1, 1, -1).expand(3, b, -1)
            hidden = lm(inputs_embeds=embeds, position_ids=positions).last_hidden_state
            at = embeds.shape[1] - 8  # the <|Reward|> token sits a few tokens before the end
            total = total + self.head(hidden[:, at].float())[:, 0]
        return total


class MPSScorer(nn.Module):
    """``clip``: CLIPModel (ViT-H/14); ``fusion``: :class:`directalign.rewards.mps.MPSFusion`; ``n_texts`` scored
    texts per image, each a prompt of the CLIP tokenizer's 77 tokens (cached features)."""

    def __init__(self, clip, fusion: nn.Module, n_texts: int):
        super().__init__()
        self.clip, self.fusion, self.n_texts = clip, fusion, n_texts

    def score(self, images: torch.Tensor) -> torch.Tensor:
        from ..rewards.preprocess import published_preprocess

        dtype = self.clip.visual_projection.weight.dtype
        size = self.clip.config.vision_config.image_size
        pixels = published_preprocess(images.to(dtype), size, "floor", clamp=True)
        state = self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).last_hidden_state)
        b, _, d = state.shape
        length = self.clip.config.text_config.max_position_embeddings
        total = 0
        for _ in range(self.n_texts):
            text = torch.zeros(b, length, d, device=state.device, dtype=state.dtype)
            fused = self.fusion(state, text, torch.zeros(b, length, device=state.device, dtype=state.dtype))[:, 0]
            total = total + F.normalize(fused, dim=-1).sum(-1)
        return total


def score(reward, images: torch.Tensor) -> torch.Tensor:
    """A scorer's ``score(images)``; a bare ``CLIPModel`` scores as a CLIP reward."""
    return reward.score(images) if hasattr(reward, "score") else probes.reward_forward(reward, images)


def scored_texts(cfg) -> int:
    """Texts scored per image: 2 for SRPO / Direct-Align's relative forms (positive and negative control phrase on
    one image encoding, ``rewards/relative.semantic_relative_reward``), else 1 (the prompt)."""
    return 2 if cfg.method in ("srpo", "direct-align") and cfg.reward.form != "absolute" else 1


def build(kind: str, folder: Path, dtype: torch.dtype, cfg) -> nn.Module:
    """The scorer of ``reward.kind`` from the config.json in ``folder``, on the meta device."""
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    n = scored_texts(cfg)
    if kind == "hpsv3":
        from ..rewards.control_words import default_control_words
        from ..rewards.relative import control_prompt

        model = build_meta(config, dtype, "Qwen2VLModel")
        hidden = model.config.text_config.hidden_size
        with torch.device("meta"):  # rewards/hpsv3.build_head's shape (the published rm_head), float32
            head = nn.Sequential(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16),
                                 nn.ReLU(), nn.Linear(16, 2))
        prompt = typical_prompt(cfg.train.prompts)
        if n == 1:
            texts = [prompt]
        else:
            pos, neg = default_control_words("hpsv3")
            pos, neg = cfg.reward.positive_words or pos, cfg.reward.negative_words or neg
            texts = [control_prompt(w[0], prompt) for w in (pos, neg)]
        return HPSv3Scorer(model, head, texts).requires_grad_(False).eval()
    model = build_meta(config, dtype)
    if kind == "mps":
        from ..rewards.mps import MPSFusion

        with torch.device("meta"):
            fusion = MPSFusion(dim=model.config.projection_dim)
        return MPSScorer(model, fusion.to(dtype), n).requires_grad_(False).eval()
    return ClipScorer(model).requires_grad_(False).eval()
