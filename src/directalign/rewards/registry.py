"""The reward registry: ``reward.kind`` -> loader, and the one factory every caller builds rewards with.

Training (:func:`load_reward`, from the ``reward`` config section), ``directalign eval --rewards KIND:PATH`` and the
tiny world's own loader (:func:`directalign.world.load.load_reward`) all go through :func:`make_reward`. A new kind
is one loader function and one line in :data:`LOADERS` (plus its name in the config's allowed kinds), and the paths
it reads in :func:`_needs`, so that ``train`` checks them before anything loads (:func:`reward_needs`,
:mod:`directalign.preflight`). What ``reward.path`` holds for each kind, and each kind's score:
:mod:`directalign.rewards.zoo`.

Every loader gets the path and one :class:`RewardOptions` (the ``reward`` section's other fields, its dtype a torch
dtype); each uses the options that apply to it. ``clamp_resized`` reaches every reward whose preprocessing resizes:
``True`` clips the resized image to [0, 1] as the published PIL pipelines do, ``False`` keeps the bicubic overshoot
as the official SRPO training code does (:mod:`directalign.rewards.preprocess`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..engine.config import DTYPE_NAMES  # the values of reward.dtype (torch-free)
from ..errors import UserError
from ..hub import clean_message
from ..world_paths import reward_dir as tiny_world_reward_dir

if TYPE_CHECKING:  # torch loads with the first reward, not with this module: `directalign --help` stays light
    import torch

    from .base import Reward

log = logging.getLogger("directalign.rewards")


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a name in :data:`DTYPE_NAMES`; a ``torch.dtype`` passes through."""
    if not isinstance(dtype, str):
        return dtype
    if dtype not in DTYPE_NAMES:
        raise RewardError(f"reward.dtype {dtype!r}; choose from {', '.join(DTYPE_NAMES)}")
    from ..engine.precision import DTYPES  # imported here: it imports torch

    return DTYPES[dtype]


def __getattr__(name: str):
    # DTYPES (name -> torch dtype) is built on first use, so that importing the registry does not import torch
    if name == "DTYPES":
        from ..engine.precision import DTYPES

        return dict(DTYPES)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class RewardError(UserError, ValueError):
    """A reward that cannot be loaded or used as configured; the one-line message names the key and the fix."""


@dataclass(frozen=True)
class RewardOptions:
    """What a loader may use besides the kind and the path (the ``reward`` section's fields, dtype resolved)."""

    divisor: float = 1.0  # score / divisor (every single-reward kind)
    use_logit_scale: bool = False  # clip: scale the cosine by logit_scale.exp() (pickscore always does)
    tokenizer: str = ""  # hpsv2 / pickscore / imagereward / clip: the text tokenizer when the weights have none
    clip_backbone: str = "openai/clip-vit-large-patch14"  # aesthetic: the CLIP ViT-L/14 under the MLP head
    siglip_backbone: str = "google/siglip-so400m-patch14-384"  # aesthetic-v25: the SigLIP under the MLP head
    dtype: str | torch.dtype = "float32"  # a name of DTYPE_NAMES or a torch dtype; a torch dtype in the loaders
    clamp_resized: bool = True  # clip the resized image to [0, 1] (PIL); False: as the official SRPO code


# ---------------------------------------------------------------------------------------------------- loaders
def _tiny_world(path: str, o: RewardOptions) -> Reward:
    from .clip import CLIPReward

    # reward.path is not read: the shipped tiny world, or the one DIRECTALIGN_WORLD_DIR points at
    return CLIPReward.from_pretrained(tiny_world_reward_dir(), name="tiny-world", divisor=o.divisor,
                                      clamp_resized=o.clamp_resized)


def _clip(path: str, o: RewardOptions) -> Reward:
    from .clip_score import ClipScoreReward

    return ClipScoreReward.from_pretrained(path, tokenizer=o.tokenizer or None, dtype=o.dtype, divisor=o.divisor,
                                           use_logit_scale=o.use_logit_scale, clamp_resized=o.clamp_resized)


def _pickscore(path: str, o: RewardOptions) -> Reward:
    from .pickscore import PickScoreReward

    return PickScoreReward.from_pretrained(path, tokenizer=o.tokenizer or None, dtype=o.dtype, divisor=o.divisor,
                                           clamp_resized=o.clamp_resized)


def _hpsv2(path: str, o: RewardOptions) -> Reward:
    from .hps import HPSv2Reward

    return HPSv2Reward.from_pretrained(path, tokenizer=o.tokenizer or None, dtype=o.dtype, divisor=o.divisor,
                                       clamp_resized=o.clamp_resized)


def _aesthetic(path: str, o: RewardOptions) -> Reward:
    from .aesthetic import LaionAestheticReward

    return LaionAestheticReward.from_pretrained(path, o.clip_backbone, dtype=o.dtype, divisor=o.divisor,
                                                clamp_resized=o.clamp_resized)


def _aesthetic_v25(path: str, o: RewardOptions) -> Reward:
    from .aesthetic_v25 import AestheticV25Reward

    return AestheticV25Reward.from_pretrained(path, o.siglip_backbone, dtype=o.dtype, divisor=o.divisor,
                                              clamp_resized=o.clamp_resized)


def _imagereward(path: str, o: RewardOptions) -> Reward:
    from .imagereward import ImageRewardReward

    return ImageRewardReward.from_pretrained(path, tokenizer=o.tokenizer or None, dtype=o.dtype, divisor=o.divisor,
                                             clamp_resized=o.clamp_resized)


def _hpsv3(path: str, o: RewardOptions) -> Reward:
    from .hpsv3 import HPSv3Reward

    return HPSv3Reward.from_pretrained(path, tokenizer=o.tokenizer or None, dtype=o.dtype, divisor=o.divisor,
                                       clamp_resized=o.clamp_resized)


def _mps(path: str, o: RewardOptions) -> Reward:
    from .mps import MPSReward

    return MPSReward.from_pretrained(path, tokenizer=o.tokenizer or None, dtype=o.dtype, divisor=o.divisor,
                                     clamp_resized=o.clamp_resized)


LOADERS: dict[str, Callable[[str, RewardOptions], Reward]] = {
    "tiny-world": _tiny_world,  # CLIPReward of the tiny world's reward/ directory (cosine)
    "clip": _clip,  # any transformers CLIPModel
    "pickscore": _pickscore,  # yuvalkirstain/PickScore_v1
    "hpsv2": _hpsv2,  # HPS_v2.1_compressed.pt (open_clip, converted on load) or a converted directory
    "aesthetic": _aesthetic,  # LAION aesthetic predictor v2 head on reward.clip_backbone (image-only)
    "aesthetic-v25": _aesthetic_v25,  # Aesthetic Predictor v2.5 head on reward.siglip_backbone (image-only)
    "imagereward": _imagereward,  # ImageReward.pt
    "hpsv3": _hpsv3,  # HPSv3.safetensors (Qwen2-VL reward model; tokenizer: reward.tokenizer, Qwen2-VL-7B-Instruct)
    "mps": _mps,  # MPS_overall safetensors / state dict (converted with tools/convert_mps.py)
}
REWARD_KINDS = (*LOADERS, "sum")  # sum: a weighted sum of registered kinds (reward.terms)


# ---------------------------------------------------------------------------------------------------- needs
@dataclass(frozen=True)
class Need:
    """One path a reward reads, checked before anything loads (:mod:`directalign.preflight`)."""

    key: str  # the config key naming it: reward.path, reward.clip_backbone, reward.terms.paths[1], ...
    value: str
    role: str  # "file": a local weights file; "model": a transformers model; "tokenizer" (both a folder or hub id)
    check: Callable[[Path], None] | None = None  # cheap structural check of the local folder (raises ValueError)
    fallback: str = ""  # tokenizer: what the loader falls back to when ``value`` holds none


def _is_weights_file(path: str) -> bool:
    return Path(path).expanduser().is_file() or path.endswith((".pt", ".pth", ".bin", ".ckpt", ".safetensors"))


def _needs(kind: str, path: str, o: RewardOptions, key: str) -> list[Need]:
    """What ``kind`` reads besides the generator (mirrors each loader above and its reward's ``from_pretrained``)."""
    from .aesthetic_v25 import check_siglip_dir
    from .clip_score import LAION_H14
    from .imagereward import BERT_TOKENIZER
    from .loading import check_clip_dir, check_model_type

    tok = "reward.tokenizer"
    if kind in ("clip", "pickscore") or (kind == "hpsv2" and not _is_weights_file(path)):
        fallback = "" if kind == "clip" else LAION_H14
        return [Need(key, path, "model", check_clip_dir),
                Need(tok if o.tokenizer else key, o.tokenizer or path, "tokenizer", fallback=fallback)]
    if kind == "hpsv2":
        return [Need(key, path, "file"), Need(tok, o.tokenizer or LAION_H14, "tokenizer")]
    if kind == "aesthetic":
        def clip_vision(p: Path) -> None:
            check_model_type(p, ("clip", "clip_vision_model"), "a CLIP ViT-L/14 (openai/clip-vit-large-patch14)")

        return [Need(key, path, "file"), Need("reward.clip_backbone", o.clip_backbone, "model", clip_vision)]
    if kind == "aesthetic-v25":
        return [Need(key, path, "file"), Need("reward.siglip_backbone", o.siglip_backbone, "model", check_siglip_dir)]
    if kind == "imagereward":
        return [Need(key, path, "file"), Need(tok, o.tokenizer or BERT_TOKENIZER, "tokenizer")]
    if kind in ("hpsv3", "mps"):  # a weights file (hpsv3: or a directory holding one) and the text tokenizer
        from .hpsv3 import QWEN2_VL_7B

        role = "model" if kind == "hpsv3" and Path(path).expanduser().is_dir() else "file"
        return [Need(key, path, role), Need(tok, o.tokenizer or (QWEN2_VL_7B if kind == "hpsv3" else LAION_H14),
                                            "tokenizer")]
    return []  # tiny-world: the shipped world (checked by its own loader); a new kind without needs: none checked


def reward_needs(r) -> list[Need]:
    """Every path the ``reward`` config section (``RewardConfig``) will read, without reading any of them."""
    options = options_from_config(r)
    if r.kind != "sum":
        pairs = [(r.kind, str(r.path), "reward.path")]
    else:
        pairs = [(k, str(p), f"reward.terms.paths[{i}]") for i, (k, p) in enumerate(zip(r.terms.kinds, r.terms.paths))]
    out, seen = [], set()
    for kind, path, key in pairs:
        for need in _needs(kind, path, options, key):
            if (need.role, need.value) not in seen:
                seen.add((need.role, need.value))
                out.append(need)
    return out


# ---------------------------------------------------------------------------------------------------- factory
def make_reward(kind: str, path: str | Path, options: RewardOptions = RewardOptions()) -> Reward:
    """One frozen reward of a registered ``kind`` from ``path`` (on the CPU)."""
    loader = LOADERS.get(kind)
    if loader is None:
        raise RewardError(f"unknown reward kind {kind!r}; choose from {', '.join(LOADERS)}")
    return loader(path, dataclasses.replace(options, dtype=torch_dtype(options.dtype)))


def build_reward(kind: str, path: str | Path, **options) -> Reward:
    """:func:`make_reward` with the options as keywords (the fields of :class:`RewardOptions`)."""
    return make_reward(kind, path, RewardOptions(**options))


def options_from_config(r) -> RewardOptions:
    """The :class:`RewardOptions` of a ``reward`` config section (``RewardConfig``)."""
    torch_dtype(r.dtype)  # a name outside DTYPE_NAMES fails here, before anything loads
    return RewardOptions(divisor=r.divisor, use_logit_scale=r.use_logit_scale, tokenizer=r.tokenizer,
                         clip_backbone=r.clip_backbone, siglip_backbone=r.siglip_backbone, dtype=r.dtype,
                         clamp_resized=r.clamp_resized)


def reward_from_config(r) -> Reward:
    """The reward a ``reward`` config section (``RewardConfig``) describes, a weighted sum for ``kind=sum``."""
    options = options_from_config(r)
    if r.kind != "sum":
        return make_reward(r.kind, r.path, options)
    from .weighted import Term, WeightedSumReward

    t = r.terms
    if not t.kinds:
        raise RewardError("reward.kind=sum needs reward.terms.kinds and reward.terms.paths (one path per kind)")
    n = len(t.kinds)
    weights, means, stds = t.weights or [1.0] * n, t.means or [0.0] * n, t.stds or [1.0] * n
    # each term's raw score (divisor 1; pickscore with its logit scale): the normalisation is the explicit mean / std
    raw = dataclasses.replace(options, divisor=1.0, use_logit_scale=False)
    rewards, terms, seen = [], [], {}
    for kind, path, w, mu, sd in zip(t.kinds, t.paths, weights, means, stds):
        seen[kind] = seen.get(kind, 0) + 1
        rewards.append(make_reward(kind, path, raw))
        terms.append(Term(kind if seen[kind] == 1 else f"{kind}#{seen[kind]}", w, mu, sd))
    reward = WeightedSumReward(rewards, terms)
    log.info(reward.describe())
    return reward


def load_reward(reward_cfg, device: torch.device | str, form: str) -> Reward:
    """The frozen reward the ``reward`` config section describes, on ``device``, for the SRPO ``form`` it will be
    used with (``absolute`` for plain Direct-Align). Anything wrong raises :class:`RewardError` with one line."""
    r = reward_cfg
    try:
        reward = reward_from_config(r)
    except (OSError, ValueError, TypeError) as e:  # TypeError: a config.json value of the wrong type
        where = "reward.terms.paths" if r.kind == "sum" else f"reward.path {str(r.path)!r}"
        raise RewardError(f"could not load {where} as reward.kind={r.kind}: {clean_message(e)}") from None
    if form != "absolute" and not reward.text_conditioned:
        raise RewardError(f"reward.kind={r.kind} is image-only, so the {form!r} SRPO form has no text to "
                          "contrast; set reward.form=absolute")
    return reward.to(device)
