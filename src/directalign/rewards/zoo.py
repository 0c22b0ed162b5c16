"""Every reward ``reward.kind`` names, built from the config (weights from a local path or a hub id, frozen).

================= ============================================================= ======================================
kind              ``reward.path``                                                score
================= ============================================================= ======================================
``tiny-world``    ``tiny-world`` (the shipped reward)                            cos / divisor
``clip``          any transformers CLIPModel (dir or hub id)                     [logit_scale.exp() *] cos / divisor
``pickscore``     ``yuvalkirstain/PickScore_v1`` (tokenizer: ``reward.tokenizer`` logit_scale.exp() * cos / divisor
                  if the model dir has none)                                     (official SRPO: divisor 20)
``hpsv2``         ``HPS_v2.1_compressed.pt`` / ``HPS_v2_compressed.pt`` (open_clip cos / divisor
                  checkpoint, converted on load) or a converted CLIPModel dir
``aesthetic``     the MLP head ``sac+logos+ava1-l14-linearMSE.pth``; the CLIP   MLP(f_img) / divisor (image-only)
                  ViT-L/14 comes from ``reward.clip_backbone``
``aesthetic-v25`` the MLP head ``aesthetic_predictor_v2_5.pth`` (discus0434's    MLP(f_img) / divisor (image-only)
                  Aesthetic Predictor v2.5); the SigLIP so400m-patch14-384 comes
                  from ``reward.siglip_backbone``
``imagereward``   ``ImageReward.pt`` (tokenizer: ``reward.tokenizer``, default   (r - mean) / std / divisor
                  bert-base-uncased)
``sum``           ``reward.terms`` (kinds, paths, weights, means, stds)          sum w_i (s_i - mean_i) / std_i
================= ============================================================= ======================================

Image-only rewards (aesthetic, aesthetic-v25) need ``reward.form=absolute``; the SRPO relative forms need a
text-conditioned reward (a sum qualifies when any term is text-conditioned).

``aesthetic-v25`` (:mod:`directalign.rewards.aesthetic_v25`) is the SigLIP-based successor of the LAION predictor
(``aesthetic``): same kind of MLP head, trained on a wider range of image domains (illustrations too), scores roughly
1-10 with 5.5+ called great by its authors. Its images are resized to 384 x 384 without a crop (SigLIP's processor).
"""

from __future__ import annotations

import logging

import torch

from .base import Reward

REWARD_KINDS = ("tiny-world", "clip", "pickscore", "hpsv2", "aesthetic", "aesthetic-v25", "imagereward", "sum")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
log = logging.getLogger("directalign.rewards")


def build_reward(kind: str, path: str, *, divisor: float = 1.0, use_logit_scale: bool = False, tokenizer: str = "",
                 clip_backbone: str = "openai/clip-vit-large-patch14",
                 siglip_backbone: str = "google/siglip-so400m-patch14-384",
                 dtype: torch.dtype = torch.float32) -> Reward:
    """One reward of ``kind`` from ``path`` (see the module table)."""
    if kind == "tiny-world":
        from ..world.load import load_reward as load_tiny

        reward = load_tiny()
        reward.divisor = divisor
        return reward
    if kind == "clip":
        from .clip_score import ClipScoreReward

        return ClipScoreReward.from_pretrained(path, tokenizer=tokenizer or None, dtype=dtype,
                                               use_logit_scale=use_logit_scale, divisor=divisor)
    if kind == "pickscore":
        from .pickscore import PickScoreReward

        return PickScoreReward.from_pretrained(path, tokenizer=tokenizer or None, dtype=dtype, divisor=divisor)
    if kind == "hpsv2":
        from .hps import HPSv2Reward

        return HPSv2Reward.from_pretrained(path, tokenizer=tokenizer or None, dtype=dtype, divisor=divisor)
    if kind == "aesthetic":
        from .aesthetic import LaionAestheticReward

        return LaionAestheticReward.from_pretrained(path, clip_backbone, dtype=dtype, divisor=divisor)
    if kind == "aesthetic-v25":
        from .aesthetic_v25 import AestheticV25Reward

        return AestheticV25Reward.from_pretrained(path, siglip_backbone, dtype=dtype, divisor=divisor)
    if kind == "imagereward":
        from .imagereward import ImageRewardReward

        return ImageRewardReward.from_pretrained(path, tokenizer=tokenizer or None, dtype=dtype, divisor=divisor)
    raise ValueError(f"unknown reward kind {kind!r}; choose from {', '.join(REWARD_KINDS)}")


def reward_from_config(r) -> Reward:
    """The reward a :class:`directalign.engine.config.RewardConfig` describes."""
    if r.dtype not in DTYPES:
        raise ValueError(f"reward.dtype {r.dtype!r}; choose from {', '.join(DTYPES)}")
    dtype = DTYPES[r.dtype]
    if r.kind != "sum":
        return build_reward(r.kind, r.path, divisor=r.divisor, use_logit_scale=r.use_logit_scale,
                            tokenizer=r.tokenizer, clip_backbone=r.clip_backbone,
                            siglip_backbone=r.siglip_backbone, dtype=dtype)
    from .weighted import Term, WeightedSumReward

    t = r.terms
    if not t.kinds:
        raise ValueError("reward.kind=sum needs reward.terms.kinds and reward.terms.paths (one path per kind)")
    n = len(t.kinds)
    weights, means, stds = t.weights or [1.0] * n, t.means or [0.0] * n, t.stds or [1.0] * n
    rewards, terms, seen = [], [], {}
    for kind, path, w, mu, sd in zip(t.kinds, t.paths, weights, means, stds):
        seen[kind] = seen.get(kind, 0) + 1
        name = kind if seen[kind] == 1 else f"{kind}#{seen[kind]}"
        # each term's raw score (divisor 1; pickscore with its logit scale): normalisation is explicit
        rewards.append(build_reward(kind, path, tokenizer=r.tokenizer, clip_backbone=r.clip_backbone,
                                    siglip_backbone=r.siglip_backbone, dtype=dtype, use_logit_scale=False))
        terms.append(Term(name, w, mu, sd))
    reward = WeightedSumReward(rewards, terms)
    log.info(reward.describe())
    return reward
