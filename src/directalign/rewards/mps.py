"""MPS, the Multi-dimensional Preference Score (Zhang et al., CVPR 2024), overall-preference model, on transformers'
``CLIPModel`` plus the condition-masked fusion of image and text tokens, differentiable in the image.

Architecture and score, as in Kwai-Kolors/MPS @ be9027f (``trainer/models/clip_model.py``,
``trainer/models/cross_modeling.py``, ``eval_overall_mps_on_hpdv2.py`` ``infer_one_sample``):

* a CLIP ViT-H/14 (laion/CLIP-ViT-H-14-laion2B-s32B-b79K's architecture and processor, fine-tuned);
* token features: every token of the prompt, ``T = text_projection(final_layer_norm(text tokens))`` (77 x 1024);
  every image token, ``I = visual_projection(vision encoder output)`` (257 x 1024; no post-layernorm, which CLIP
  applies only to the pooled token); the pooled text ``t = text_projection(EOS token)``;
* condition mask (:func:`condition_mask`): the condition text :data:`CONDITION` (the overall-preference dimensions)
  gives token features ``C``; text token i is visible when ``max_j <T_i, C_j> / max_{i,j} <T_i, C_j> > 0.3``
  (0.3 at inference, 0.01 in training), else its attention logit is -inf;
* fusion (:class:`MPSFusion`, the published ``Cross_model(dim=1024, layer_num=4, heads=16)``): 4 layers of [masked
  cross-attention from the image tokens to the text tokens, multi-query (one 64-d key / value head), 16 query heads of
  64, with a parallel SwiGLU feed-forward] + [parallel self-attention / SwiGLU block with rotary positions], each
  residual, pre-norm LayerNorms without bias; the fused image token 0 is the image feature ``i``;
* **score = logit_scale.exp() * cos(i, t) / divisor.**

The mask's maximum is taken over one prompt's tokens (the official evaluation scores one prompt at a time; its
batch-wide maximum would make a score depend on the other prompts of the batch). The text side (T, t, mask) does not
depend on the image and is cached per prompt, so SRPO's control phrases cost one text forward each.

Preprocessing: CLIPImageProcessor of the ViT-H/14 (shortest side 224 bicubic, centre crop with the floor offset,
OpenAI mean / std): :func:`directalign.rewards.preprocess.published_preprocess` ``crop="floor"``.

Weights: the published ``MPS_overall_checkpoint.pth`` is a whole pickled model (``torch.save(model)``), which
``torch.load(weights_only=True)`` refuses: convert it once with ``tools/convert_mps.py`` (run in a separate venv; it
writes a ``.safetensors`` state dict), then ``reward.path`` = that file. A ``.pth`` holding only the state dict
loads too. Keys: ``model.<transformers CLIPModel key>`` and ``cross_model.layers.<i>.<0|1>.fn.<...>``; the CLIP
architecture comes from the tensor shapes (heads: open_clip's head widths, as for HPSv2). ``reward.tokenizer``
(default laion/CLIP-ViT-H-14-laion2B-s32B-b79K) gives the tokenizer.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import Reward
from .preprocess import published_preprocess

CONDITION = ("light, color, clarity, tone, style, ambiance, artistry, shape, face, hair, hands, limbs, structure, "
             "instance, texture, quantity, attributes, position, number, location, word, things.")
MASK_THRESHOLD = 0.3
CONVERT_HINT = "convert it once with tools/convert_mps.py (runs in a separate venv) and use the .safetensors it writes"


def condition_mask(text_tokens: torch.Tensor, condition_tokens: torch.Tensor,
                   threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """(B, L, d) prompt token features and (B, Lc, d) condition token features -> (B, L) additive mask: 0 where the
    token's best similarity to a condition token, over the prompt's best, exceeds ``threshold``, else -inf."""
    sim = torch.einsum("bid,bjd->bij", text_tokens, condition_tokens).amax(-1)
    sim = sim / sim.amax(-1, keepdim=True)
    zero = torch.zeros((), dtype=text_tokens.dtype, device=text_tokens.device)
    return torch.where(sim > threshold, zero, torch.full_like(zero, float("-inf")))


# ---------------------------------------------------------------------------------------------------- fusion
class _BiasFreeLayerNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.register_buffer("bias", torch.zeros(dim))  # a zero buffer, stored in the published state dict

    def forward(self, x):
        return F.layer_norm(x, x.shape[-1:], self.weight, self.bias)


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x, *args):
        return self.fn(x, *args) + x


class _SwiGLU(nn.Module):
    def forward(self, x):
        x, gate = x.chunk(2, dim=-1)
        return F.silu(gate) * x


class _Rotary(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def forward(self, n: int, device) -> torch.Tensor:
        freqs = torch.outer(torch.arange(n, device=device, dtype=self.inv_freq.dtype), self.inv_freq)
        return torch.cat((freqs, freqs), dim=-1)


def _rotate(pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Rotary embedding with the halves convention: ``t cos + rotate_half(t) sin``."""
    a, b = t.chunk(2, dim=-1)
    return t * pos.cos().to(t.dtype) + torch.cat((-b, a), dim=-1) * pos.sin().to(t.dtype)


class _CrossAttention(nn.Module):
    """Masked multi-query cross-attention (queries: image tokens; one key / value head: text tokens) with a
    parallel SwiGLU feed-forward on the queries."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_inner: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm = _BiasFreeLayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff = nn.Sequential(nn.Linear(dim, 2 * ff_inner, bias=False), _SwiGLU(),
                                nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x, context, mask):
        x = self.norm(x)
        b, n, _ = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2) * self.scale
        k, v = self.to_kv(context).chunk(2, dim=-1)
        sim = torch.einsum("bhid,bjd->bhij", q, k) + mask[:, None, None, :]
        attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out) + self.ff(x)


class _ParallelBlock(nn.Module):
    """Self-attention (multi-query, rotary positions) and a SwiGLU feed-forward from one fused projection."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_inner: int):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.split = (heads * dim_head, dim_head, dim_head, 2 * ff_inner)
        self.norm = _BiasFreeLayerNorm(dim)
        self.rotary_emb = _Rotary(dim_head)
        self.fused_attn_ff_proj = nn.Linear(dim, sum(self.split), bias=False)
        self.attn_out = nn.Linear(heads * dim_head, dim, bias=False)
        self.ff_out = nn.Sequential(_SwiGLU(), nn.Linear(ff_inner, dim, bias=False))

    def forward(self, x):
        x = self.norm(x)
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(x).split(self.split, dim=-1)
        pos = self.rotary_emb(n, x.device)
        q = _rotate(pos, q.view(b, n, self.heads, -1).transpose(1, 2)) * self.scale
        sim = torch.einsum("bhid,bjd->bhij", q, _rotate(pos, k))
        attn = (sim - sim.amax(-1, keepdim=True)).softmax(-1)
        out = torch.einsum("bhij,bjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1)
        return self.attn_out(out) + self.ff_out(ff)


class MPSFusion(nn.Module):
    """The published ``Cross_model`` (parameter names kept: ``layers.<i>.0.fn`` cross, ``layers.<i>.1.fn`` self)."""

    def __init__(self, dim: int = 1024, layers: int = 4, heads: int = 16, dim_head: int = 64, ff_mult: int = 4):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.ModuleList([_Residual(_CrossAttention(dim, heads, dim_head, ff_mult * dim)),
                           _Residual(_ParallelBlock(dim, heads, dim_head, ff_mult * dim))]) for _ in range(layers))

    def forward(self, image_tokens, text_tokens, mask):
        """(B, N, d) image tokens, (B, L, d) text tokens, (B, L) additive mask -> fused (B, N, d)."""
        x = image_tokens
        for cross, block in self.layers:
            x = block(cross(x, text_tokens, mask))
        return x

    @classmethod
    def from_state_dict(cls, sd: dict) -> MPSFusion:
        n = 0
        while f"layers.{n}.0.fn.to_q.weight" in sd:
            n += 1
        if n == 0:
            raise ValueError("no cross_model.layers.0.0.fn.to_q.weight: not an MPS checkpoint")
        q, kv = sd["layers.0.0.fn.to_q.weight"], sd["layers.0.0.fn.to_kv.weight"]
        dim_head = kv.shape[0] // 2
        ff_inner = sd["layers.0.0.fn.ff.2.weight"].shape[1]
        fusion = cls(q.shape[1], n, q.shape[0] // dim_head, dim_head, ff_inner // q.shape[1])
        fusion.load_state_dict(sd)
        return fusion


# ---------------------------------------------------------------------------------------------------- weights
VISION_HEAD_WIDTH = {768: 64, 1024: 64, 1280: 80, 1408: 88, 1664: 104}  # open_clip ViT-B/L/H/g/bigG


def clip_config_from_state_dict(sd: dict, eos_token_id: int | None = None, hidden_act: str = "gelu"):
    """A transformers ``CLIPConfig`` for CLIPModel weights ``sd`` (shapes from the tensors; heads from open_clip's
    head widths: vision 80 for ViT-H, text 64)."""
    from transformers import CLIPConfig

    def count(prefix):
        n = 0
        while f"{prefix}.{n}.mlp.fc1.weight" in sd:
            n += 1
        return n

    try:
        width, _, patch, _ = sd["vision_model.embeddings.patch_embedding.weight"].shape
        grid = math.isqrt(sd["vision_model.embeddings.position_embedding.weight"].shape[0] - 1)
        vocab, t_width = sd["text_model.embeddings.token_embedding.weight"].shape
        proj = sd["visual_projection.weight"].shape[0]
        text = {"vocab_size": vocab, "hidden_size": t_width, "num_hidden_layers": count("text_model.encoder.layers"),
                "intermediate_size": sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                "num_attention_heads": max(1, t_width // 64), "hidden_act": hidden_act, "projection_dim": proj,
                "max_position_embeddings": sd["text_model.embeddings.position_embedding.weight"].shape[0],
                "eos_token_id": vocab - 1 if eos_token_id is None else eos_token_id}
        vision = {"hidden_size": width, "num_hidden_layers": count("vision_model.encoder.layers"),
                  "intermediate_size": sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                  "num_attention_heads": max(1, width // VISION_HEAD_WIDTH.get(width, 64)),
                  "image_size": grid * patch, "patch_size": patch, "hidden_act": hidden_act, "projection_dim": proj}
    except KeyError as e:
        raise ValueError(f"not an MPS checkpoint: no model.{e.args[0]}") from None
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=proj)


def load_mps_state_dict(path: str | Path) -> tuple[dict, dict]:
    """(CLIPModel keys, fusion keys) of a converted MPS checkpoint; the pickled original gets a one-line error
    naming the converter."""
    from .loading import WeightsFileError, load_weights_file

    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; reward.path must be the MPS checkpoint converted with "
                                "tools/convert_mps.py (a .safetensors)")
    try:
        sd = load_weights_file(p)
    except WeightsFileError as e:
        if "pickled Python objects" in str(e):
            raise WeightsFileError(f"{str(p)!r} is a whole pickled model (the published MPS_overall_checkpoint.pth "
                                   f"is), refused by torch.load(weights_only=True), nothing in it ran; {CONVERT_HINT}"
                                   ) from None
        raise
    clip, fusion = {}, {}
    for key, value in sd.items():
        if key.startswith("model."):
            if not key.endswith("position_ids"):
                clip[key[len("model."):]] = value
        elif key.startswith("cross_model."):
            fusion[key[len("cross_model."):]] = value
    if not clip or not fusion:
        raise ValueError(f"{p} is not an MPS checkpoint: it needs model.* (CLIP) and cross_model.* (fusion) weights")
    return clip, fusion


# ---------------------------------------------------------------------------------------------------- reward
class MPSReward(Reward):
    """``clip``: a transformers ``CLIPModel``; ``fusion``: :class:`MPSFusion`; ``tokenizer``: the CLIP tokenizer."""

    name = "mps"

    def __init__(self, clip, fusion: MPSFusion, tokenizer, *, divisor: float = 1.0, condition: str = CONDITION,
                 threshold: float = MASK_THRESHOLD, clamp_resized: bool = True, name: str = "mps"):
        super().__init__()
        self.clip, self.fusion, self.tokenizer = clip, fusion, tokenizer
        self.divisor, self.condition, self.threshold = divisor, condition, threshold
        self.clamp_resized, self.name = clamp_resized, name
        self.image_size = clip.config.vision_config.image_size
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.freeze()

    def describe(self) -> str | None:
        return f"mps: logit_scale.exp() * cos(fused image token, prompt) / {self.divisor:g}"

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer: str | Path | None = None, dtype=torch.float32,
                        **kwargs) -> MPSReward:
        from transformers import CLIPModel

        from .clip_score import LAION_H14, load_clip_tokenizer

        clip_sd, fusion_sd = load_mps_state_dict(path)
        tok = load_clip_tokenizer(tokenizer or LAION_H14)
        model = CLIPModel(clip_config_from_state_dict(clip_sd, eos_token_id=tok.eos_token_id))
        try:
            missing, unexpected = model.load_state_dict({k: v.float() for k, v in clip_sd.items()}, strict=False)
            fusion = MPSFusion.from_state_dict({k: v.float() for k, v in fusion_sd.items()})
        except RuntimeError as e:  # a tensor of another shape, a missing or extra fusion weight
            first = next((x.strip() for x in str(e).splitlines()[1:] if x.strip()), type(e).__name__)
            raise ValueError(f"{path}: weights that do not fit MPS's CLIP + fusion ({first[:200]})") from None
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"{path}: its CLIP weights do not fit a CLIPModel (missing {missing[:2]}, unexpected "
                             f"{unexpected[:2]})")
        return cls(model.to(dtype), fusion.to(dtype), tok, **kwargs)

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                             return_tensors="pt").input_ids
        return ids.to(self.clip.logit_scale.device)

    @torch.no_grad()
    def text_state(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(token features (B, L, d), pooled feature (B, d) normalised, mask (B, L)), cached per text."""
        missing = sorted({t for t in texts if t not in self._text})
        if missing:
            out = self.clip.text_model(input_ids=self._tokens(missing))  # no attention mask, as upstream
            tokens = self.clip.text_projection(out.last_hidden_state)
            pooled = F.normalize(self.clip.text_projection(out.pooler_output), dim=-1)
            cond = self.clip.text_projection(self.clip.text_model(input_ids=self._tokens([self.condition]))
                                             .last_hidden_state).expand(len(missing), -1, -1)
            mask = condition_mask(tokens, cond, self.threshold)
            for i, t in enumerate(missing):
                self._text[t] = (tokens[i], pooled[i], mask[i])
        rows = [self._text[t] for t in texts]
        return tuple(torch.stack([r[i] for r in rows]) for i in range(3))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> projected image tokens (B, 1 + patches, d), differentiable."""
        dtype = self.clip.visual_projection.weight.dtype
        pixels = published_preprocess(images.to(dtype), self.image_size, "floor", clamp=self.clamp_resized)
        return self.clip.visual_projection(self.clip.vision_model(pixel_values=pixels).last_hidden_state)

    def score_texts(self, image_state: torch.Tensor, texts: list[str]) -> torch.Tensor:
        tokens, pooled, mask = (x.to(image_state.device) for x in self.text_state(texts))
        fused = self.fusion(image_state, tokens.to(image_state.dtype), mask.to(image_state.dtype))[:, 0]
        cos = (F.normalize(fused, dim=-1) * pooled.to(fused.dtype)).sum(-1)
        return self.clip.logit_scale.exp().to(cos.dtype) * cos / self.divisor
