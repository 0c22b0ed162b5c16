"""ImageReward (Xu et al. 2023, THUDM/ImageReward) on transformers' BLIP classes, without the ``image-reward``
package, BLIP's code or torchvision.

The model: BLIP's ViT-L/16 image encoder; a BERT-base text encoder whose every layer cross-attends to all image
tokens (BLIP's ``med.BertModel``, bidirectional); an MLP (768-1024-128-64-16-1, dropout, no activations) on the text
encoder's [CLS] output; the published normalisation ``(r - 0.16717362830052426) / 1.0333394966054072``. Exactly
``ImageReward.score``: the prompt is tokenized with bert-base-uncased, padded to 35 tokens.

``ImageReward.pt`` (hub repo ``THUDM/ImageReward``) is a plain state dict, read with ``torch.load(weights_only=True)``
and mapped onto ``transformers.BlipVisionModel`` + ``BlipTextModel`` (config inferred from the tensor shapes):

=============================================== ===================================================
ImageReward.pt                                  transformers
=============================================== ===================================================
``blip.visual_encoder.patch_embed.proj.*``      ``vision.embeddings.patch_embedding.*``
``blip.visual_encoder.cls_token``               ``vision.embeddings.class_embedding``
``blip.visual_encoder.pos_embed``               ``vision.embeddings.position_embedding``
``blip.visual_encoder.blocks.N.norm1/norm2``    ``vision.encoder.layers.N.layer_norm1/layer_norm2``
``blip.visual_encoder.blocks.N.attn.qkv``       ``vision.encoder.layers.N.self_attn.qkv`` (same fused layout)
``blip.visual_encoder.blocks.N.attn.proj``      ``vision.encoder.layers.N.self_attn.projection``
``blip.visual_encoder.blocks.N.mlp.fc1/fc2``    ``vision.encoder.layers.N.mlp.fc1/fc2``
``blip.visual_encoder.norm``                    ``vision.post_layernorm``
``blip.text_encoder.*``                         ``text.*`` (transformers' BlipText is a port of med.py: same names)
``mlp.layers.*``                                ``head.layers.*``
``blip.vision_proj``, ``blip.text_proj``        unused by the score, dropped
=============================================== ===================================================

BLIP's ViT uses LayerNorm eps 1e-6 and BERT 1e-12; heads are width / 64 (ViT-L 16, BERT-base 12).
``tests/test_reward_zoo.py`` proves the mapping against a reference implementation of BLIP's ViT and med BERT
forward written with ImageReward's parameter names, on random weights.

Preprocessing: ImageReward's ``_transform(224)``: shortest side 224 bicubic, torchvision centre crop
(``crop="round"``), OpenAI CLIP mean / std.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch
from torch import nn

from .aesthetic import AestheticMLP, load_state_dict_file
from .base import Reward
from .preprocess import published_preprocess

IMAGEREWARD_HUB_REPO = "THUDM/ImageReward"
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
TEXT_MAX_LENGTH = 35
BERT_TOKENIZER = "bert-base-uncased"

_VISION = {
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
_VISION_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.qkv": "self_attn.qkv",
                 "attn.proj": "self_attn.projection", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_DROPPED = ("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.")


def convert_imagereward_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``{"vision": ..., "text": ..., "head": ...}`` state dicts for BlipVisionModel, BlipTextModel, AestheticMLP."""
    out: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "head": {}}
    for key, value in sd.items():
        if key.startswith(_DROPPED) or key.endswith("position_ids"):
            continue
        if key.startswith("blip.visual_encoder."):
            k = key[len("blip.visual_encoder."):]
            if k in _VISION:
                out["vision"][_VISION[k]] = value
                continue
            m = _BLOCK_KEY.match(k)
            if not m or m.group(2) not in _VISION_BLOCK:
                raise ValueError(f"ImageReward key {key!r} has no BlipVisionModel counterpart")
            out["vision"][f"encoder.layers.{m.group(1)}.{_VISION_BLOCK[m.group(2)]}.{m.group(3)}"] = value
        elif key.startswith("blip.text_encoder."):
            out["text"][key[len("blip.text_encoder."):]] = value
        elif key.startswith("mlp."):
            out["head"][key[len("mlp."):]] = value
        else:
            raise ValueError(f"ImageReward key {key!r} is not part of the BLIP encoders or the MLP")
    return out


def _count(sd: dict, pattern: str) -> int:
    n = 0
    while pattern.format(n) in sd:
        n += 1
    return n


def blip_configs(parts: dict[str, dict[str, torch.Tensor]]):
    """(BlipVisionConfig, BlipTextConfig) from converted tensors' shapes."""
    from transformers import BlipTextConfig, BlipVisionConfig

    v, t = parts["vision"], parts["text"]
    width, _, patch, _ = v["embeddings.patch_embedding.weight"].shape
    grid = math.isqrt(v["embeddings.position_embedding"].shape[1] - 1)
    vision = BlipVisionConfig(hidden_size=width, intermediate_size=v["encoder.layers.0.mlp.fc1.weight"].shape[0],
                              num_hidden_layers=_count(v, "encoder.layers.{}.layer_norm1.weight"),
                              num_attention_heads=width // 64, image_size=grid * patch, patch_size=patch,
                              hidden_act="gelu", layer_norm_eps=1e-6)
    vocab, hidden = t["embeddings.word_embeddings.weight"].shape
    text = BlipTextConfig(vocab_size=vocab, hidden_size=hidden,
                          encoder_hidden_size=t["encoder.layer.0.crossattention.self.key.weight"].shape[1],
                          intermediate_size=t["encoder.layer.0.intermediate.dense.weight"].shape[0],
                          num_hidden_layers=_count(t, "encoder.layer.{}.attention.self.query.weight"),
                          num_attention_heads=hidden // 64,
                          max_position_embeddings=t["embeddings.position_embeddings.weight"].shape[0],
                          hidden_act="gelu", layer_norm_eps=1e-12, is_decoder=True, pad_token_id=0,
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return vision, text


def _load_strict(module: nn.Module, sd: dict, what: str) -> None:
    missing, unexpected = module.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"ImageReward {what} weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


def blip_tokenizer(path: str | Path = BERT_TOKENIZER):
    """bert-base-uncased with BLIP's extra tokens ([DEC] as bos, [ENC]), as ``init_tokenizer`` builds it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if "[DEC]" not in tok.get_vocab():
        tok.add_special_tokens({"bos_token": "[DEC]"})
    if "[ENC]" not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageRewardReward(Reward):
    """ImageReward score of images in [0, 1] for texts; differentiable through the images (the ReFL setting)."""

    crop = "round"

    def __init__(self, vision, text, head: AestheticMLP, tokenizer, *, mean: float = IMAGEREWARD_MEAN,
                 std: float = IMAGEREWARD_STD, divisor: float = 1.0, max_length: int = TEXT_MAX_LENGTH,
                 name: str = "imagereward", clamp_resized: bool = True):
        super().__init__()
        self.vision, self.text, self.head = vision, text, head
        self.tokenizer = tokenizer
        self.mean, self.std, self.divisor = mean, std, divisor
        self.max_length = max_length
        self.image_size = vision.config.image_size
        self.name = name
        self.clamp_resized = clamp_resized  # False: keep the resize's bicubic overshoot
        self._tokens: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.freeze()

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], tokenizer, dtype=torch.float32, **kwargs):
        from transformers import BlipTextModel, BlipVisionModel

        parts = convert_imagereward_state_dict(sd)
        vision_cfg, text_cfg = blip_configs(parts)
        vision, text = BlipVisionModel(vision_cfg), BlipTextModel(text_cfg, add_pooling_layer=False)
        head = AestheticMLP(parts["head"]["layers.0.weight"].shape[1])
        _load_strict(vision, parts["vision"], "vision")
        _load_strict(text, parts["text"], "text")
        _load_strict(head, parts["head"], "MLP")
        return cls(vision.to(dtype), text.to(dtype), head.to(dtype), tokenizer, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | Path, tokenizer: str | Path | None = None, dtype=torch.float32,
                        **kwargs) -> "ImageRewardReward":
        """``path``: ``ImageReward.pt``; ``tokenizer``: bert-base-uncased (directory or hub id)."""
        return cls.from_state_dict(load_state_dict_file(path), blip_tokenizer(tokenizer or BERT_TOKENIZER),
                                   dtype=dtype, **kwargs)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """All image tokens after the ViT's final norm (B, 1 + patches, width): what the text encoder attends to."""
        dtype = self.vision.embeddings.patch_embedding.weight.dtype
        pixels = published_preprocess(images.to(dtype), self.image_size, self.crop, clamp=self.clamp_resized)
        return self.vision(pixel_values=pixels).last_hidden_state

    @torch.no_grad()
    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = sorted({t for t in texts if t not in self._tokens})
        if missing:
            tok = self.tokenizer(missing, padding="max_length", truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            for i, t in enumerate(missing):
                self._tokens[t] = (tok.input_ids[i], tok.attention_mask[i])
        ids = torch.stack([self._tokens[t][0] for t in texts])
        mask = torch.stack([self._tokens[t][1] for t in texts])
        return ids, mask

    def score_texts(self, image_state: torch.Tensor, texts: list[str]) -> torch.Tensor:
        ids, mask = self._tokenize(texts)
        device = image_state.device
        image_atts = torch.ones(image_state.shape[:-1], dtype=torch.long, device=device)
        out = self.text(input_ids=ids.to(device), attention_mask=mask.to(device), encoder_hidden_states=image_state,
                        encoder_attention_mask=image_atts, return_dict=True)
        r = self.head(out.last_hidden_state[:, 0, :]).squeeze(-1)
        return (r - self.mean) / self.std / self.divisor
