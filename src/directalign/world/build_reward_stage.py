"""The world build's reward stage: a CLIPModel trained contrastively on rendered images of all 120 combinations, with
partial captions, SRPO-style prefixes and one-attribute-swapped hard negatives. ``directalign.world.build`` runs it
(in its own process when ``--parallel``)."""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from . import architecture as arch
from . import dataset as ds
from .build_common import LOG, _cosine_lr, _log

# Reward captions name shape always, each colour with this probability, and the styles the example names: partial
# captions make the text tower represent each attribute on its own, so held-out colour/shape combinations compose.
REWARD_NAME_COLOUR_PROB = 0.8


def _reward_names(names_texture: bool, names_lighting: bool, rng) -> tuple[str, ...]:
    names = ["shape"]
    names += [k for k in ("fg", "bg") if rng.random() < REWARD_NAME_COLOUR_PROB]
    names += (["texture"] if names_texture else []) + (["lighting"] if names_lighting else [])
    return tuple(names)


def _swap_one(attrs: ds.Attributes, names: tuple[str, ...], rng) -> ds.Attributes:
    """The same attributes with exactly one named attribute changed (a hard negative); shape twice as often."""
    keys = [k for k in names for _ in range(2 if k == "shape" else 1)]
    key = keys[rng.integers(len(keys))]
    options = {"fg": [c for c in ds.COLORS if c not in (attrs.fg, attrs.bg)],
               "bg": [c for c in ds.COLORS if c not in (attrs.fg, attrs.bg)],
               "shape": [s for s in ds.SHAPES if s != attrs.shape],
               "texture": [t for t in ds.TEXTURES if t != attrs.texture],
               "lighting": [t for t in ds.LIGHTINGS if t != attrs.lighting]}[key]
    return ds.with_style(attrs, **{key: options[rng.integers(len(options))]})


def reward_caption(attrs: ds.Attributes, names: tuple[str, ...], rng) -> str:
    """A caption naming ``names``; style words as suffixes or as SRPO-style ``"<word>. "`` prefixes."""
    text = f"a {attrs.fg} {attrs.shape}" if "fg" in names else f"a {attrs.shape}"
    if "bg" in names:
        text += f" on a {attrs.bg} background"
    words = [getattr(attrs, k) for k in ("texture", "lighting") if k in names]
    if rng.random() < 0.5:
        return text + "".join(f", {w}" for w in words)
    rng.shuffle(words)
    return "".join(f"{w}. " for w in words) + text


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Mild blur and noise so the reward also reads imperfect (generated) images."""
    b = images.shape[0]
    blur = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    w = torch.rand(b, 1, 1, 1, generator=gen) * 0.5
    out = (1 - w) * images + w * blur
    out = out + torch.randn(out.shape, generator=gen) * 0.03 * torch.rand(b, 1, 1, 1, generator=gen)
    return out.clamp(0, 1)


def train_reward(steps: int, batch: int, seed: int):
    from ..rewards.clip import CLIP_MEAN, CLIP_STD, projected_features

    torch.manual_seed(seed)
    model, tok = arch.new_reward()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    mean = torch.tensor(CLIP_MEAN)[None, :, None, None]
    std = torch.tensor(CLIP_STD)[None, :, None, None]
    t0 = time.time()
    for step in range(steps):
        lr = _cosine_lr(step, steps, 1e-3, 200)
        for g in opt.param_groups:
            g["lr"] = lr
        # All 120 combinations: the reward plays a broadly trained preference model (like HPSv2 for FLUX). Trained on
        # the generator's 96 only, its vision tower read shapes of unseen colour pairs poorly (held-out one-attribute
        # retrieval 0.71, all misses on shape); the generator never sees the 24 held-out combinations either way.
        examples = ds.sample_examples(batch, seed=seed * 7919 + step, split="all")
        images = augment(ds.render_batch(examples), gen)
        names = [_reward_names(e.names_texture, e.names_lighting, rng) for e in examples]
        pos = [reward_caption(e.attrs, n, rng) for e, n in zip(examples, names)]
        neg = [reward_caption(_swap_one(e.attrs, n, rng), n, rng) for e, n in zip(examples, names)]
        text_in = tok(pos + neg, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt")
        img_emb = F.normalize(projected_features(model.get_image_features(pixel_values=(images - mean) / std)), dim=-1)
        txt_emb = F.normalize(projected_features(model.get_text_features(input_ids=text_in.input_ids)), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        logits = scale * img_emb @ txt_emb.T  # (B, 2B): columns B.. are hard negatives
        target = torch.arange(batch)
        # Captions that omit a style word also fit other images of the batch: mask exact duplicates of the positive.
        dup = torch.tensor([[pos[i] == pos[j] and i != j for j in range(batch)] for i in range(batch)])
        logits_i = logits.clone()
        logits_i[:, :batch] = logits_i[:, :batch].masked_fill(dup, -1e4)
        loss = (F.cross_entropy(logits_i, target) + F.cross_entropy(logits[:, :batch].T.masked_fill(dup, -1e4),
                                                                     target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            _log("reward", step=step, loss=loss.item(), scale=scale.item(), secs=time.time() - t0)
    model.eval().requires_grad_(False)
    LOG["reward"] = dict(steps=steps, batch=batch, seconds=time.time() - t0)
    return model, tok
