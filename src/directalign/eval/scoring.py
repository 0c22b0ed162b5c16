"""Scoring images with the rewards of ``--rewards``: each image's absolute score and SGP-style relative score.

A spec is ``train`` (the config's training reward, loaded as training loads it), ``tiny-world``, or ``KIND:PATH``
for any kind of the reward registry (:data:`directalign.rewards.registry.LOADERS`), built by the factory training
uses. The relative score is ``s("<pos>. <prompt>") - s("<neg>. <prompt>")`` with ``--relative-words POS NEG``
(default :data:`TINY_RELATIVE_WORDS` for the tiny world's reward, :data:`GENERAL_RELATIVE_WORDS` otherwise, as in
the SRPO paper's SGP-HPS).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..rewards.registry import LOADERS
from . import EvalError

GENERAL_RELATIVE_WORDS = ("Realistic photo", "CG Render")
TINY_RELATIVE_WORDS = ("textured", "flat")
PATH_KINDS = tuple(k for k in LOADERS if k != "tiny-world")  # the kinds a KIND:PATH spec names


@dataclass
class RewardSpec:
    name: str
    model: object
    positive: str
    negative: str


def reward_spec_help() -> str:
    """Every form an ``--rewards`` item takes, from the registry: ``train, tiny-world, clip:PATH, ...``."""
    return ", ".join(["train", "tiny-world", *(f"{k}:PATH" for k in PATH_KINDS)])


def requested_rewards(items: list[str] | None, trained: bool) -> list[str]:
    """The specs of the ``--rewards`` items (each comma-separated); without any, ``train`` when the config defines
    a training reward."""
    if items:
        return [s for item in items for s in item.split(",") if s.strip()]
    if trained:
        return ["train"]
    raise EvalError("no reward to score with: pass --rewards, e.g. --rewards clip:/path/to/clip")


def _load_registered(kind: str, path: str, cfg, spec: str):
    """The reward of an ``--rewards KIND:PATH`` spec, built by the factory training uses
    (:func:`directalign.rewards.registry.make_reward`) with the run's reward settings: ``reward.dtype``, the
    backbones, ``reward.clamp_resized``, and ``reward.tokenizer`` only when KIND is the run's own kind (it names a
    tokenizer of that kind). Scores are raw (divisor 1, plain cosine for ``clip``) except PickScore, divided by 20
    as in the official SRPO code."""
    from ..rewards.pickscore import SRPO_DIVISOR
    from ..rewards.registry import make_reward, options_from_config

    r = cfg.reward
    own_kind = kind == r.kind or kind in r.terms.kinds
    options = dataclasses.replace(options_from_config(r), divisor=SRPO_DIVISOR if kind == "pickscore" else 1.0,
                                  use_logit_scale=False, tokenizer=r.tokenizer if own_kind else "")
    try:
        return make_reward(kind, path, options)
    except (OSError, ValueError, TypeError) as e:  # TypeError: a config.json value of the wrong type
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EvalError(f"--rewards {spec!r}: could not load {path!r} as reward kind {kind}: {first}") from None


def _spec_name(kind: str, path: str) -> str:
    if kind == "clip":
        return f"clip-{Path(path).name or path}"
    return kind


def training_reward_model(cfg):
    """The reward model of ``cfg.reward`` (the one the run trained against), loaded as training loads it (the
    registry's :func:`~directalign.rewards.registry.load_reward`, checked against the method's held-out form), on
    ``cfg.model.device``."""
    from ..engine.finetune import resolve_device
    from ..rewards.registry import load_reward
    from .heldout import held_out_form

    return load_reward(cfg.reward, resolve_device(cfg.model.device), held_out_form(cfg)[0])


def load_rewards(specs: list[str], cfg, trained: bool, relative_words: list[str] | None,
                 train_model=None) -> list[RewardSpec]:
    """The rewards of ``--rewards`` specs (see the module docstring), each with its relative words and a unique
    name."""
    from ..engine.finetune import resolve_device

    device = resolve_device(cfg.model.device)
    out: list[RewardSpec] = []
    for spec in specs:
        spec = spec.strip()
        kind, _, path = spec.partition(":")
        kind, path = kind.strip(), path.strip()
        if kind == "train":
            if not trained:
                raise EvalError("--rewards train needs a run or --config that defines the training reward")
            model = train_model if train_model is not None else training_reward_model(cfg)
            is_world, name = cfg.reward.kind == "tiny-world", _spec_name(cfg.reward.kind, cfg.reward.path)
        elif kind == "tiny-world" and not path:
            model, is_world, name = _load_registered(kind, kind, cfg, spec).to(device), True, kind
        elif kind in PATH_KINDS and path:
            if not Path(path).expanduser().exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
                raise EvalError(f"--rewards {spec!r}: {path!r} does not exist; give the {kind} weights (a local "
                                "path or a hub id; directalign.rewards.zoo lists what each kind loads)")
            model = _load_registered(kind, str(Path(path).expanduser()), cfg, spec).to(device)
            is_world, name = False, _spec_name(kind, path)
        else:
            raise EvalError(f"--rewards: unknown reward {spec!r}; use train, tiny-world or KIND:PATH with KIND one "
                            f"of {', '.join(PATH_KINDS)}")
        if relative_words:
            pos, neg = relative_words
        else:
            pos, neg = TINY_RELATIVE_WORDS if is_world else GENERAL_RELATIVE_WORDS
        base_name, i = name, 2
        while any(r.name == name for r in out):
            name, i = f"{base_name}-{i}", i + 1
        out.append(RewardSpec(name, model, pos, neg))
    return out


def score_images(spec: RewardSpec, images, prompts: list[str], chunk: int = 64) -> dict:
    """Per-image absolute and relative scores (N,) and the normalised image embeddings (N, D; D = 0 when the
    reward's image state is not a tensor)."""
    import torch  # here, not at the top: the CLI imports this module for its help text

    from ..rewards.relative import control_prompt

    scores, rel, emb = [], [], []
    r = spec.model
    dev = next(r.parameters()).device
    with torch.no_grad():
        for i in range(0, len(prompts), chunk):
            im, pr = images[i : i + chunk].to(dev), prompts[i : i + chunk]
            state = r.encode_images(im)
            scores.append(r.score_texts(state, pr).float().cpu())
            pos = r.score_texts(state, [control_prompt(spec.positive, p) for p in pr]).float().cpu()
            neg = r.score_texts(state, [control_prompt(spec.negative, p) for p in pr]).float().cpu()
            rel.append(pos - neg)
            emb.append(state.float().cpu() if isinstance(state, torch.Tensor) else torch.zeros(len(pr), 0))
    return {"score": torch.cat(scores), "relative": torch.cat(rel), "embedding": torch.cat(emb)}
