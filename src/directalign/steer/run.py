"""Running a steerer the way ``directalign sample --steer`` and :func:`directalign.api.steer` do: its options from
keyword values, the score function of a ``--rewards`` spec, and a progress bar over its NFE."""

from __future__ import annotations

import dataclasses

from .base import SteerError, SteerSettings, flag_name, options_of


def build_options(name: str, values: dict | None = None):
    """Steerer ``name``'s options with ``values`` ({field or flag name: value}; ``lambda`` names the field ``lam``)
    over its defaults, validated; an unknown steerer or option is a one-line :class:`SteerError`."""
    from .registry import STEERERS

    if name not in STEERERS:
        raise SteerError(f"unknown steering method {name!r}; choose one of {', '.join(STEERERS)}")
    steerer = STEERERS[name]
    fields = {f.name: f for f in dataclasses.fields(steerer.Options)}
    by_flag = {flag_name(f)[len("--steer-"):].replace("-", "_"): n for n, f in fields.items()}
    kw = {}
    for key, value in (values or {}).items():
        field = key if key in fields else by_flag.get(key)
        if field is None:
            raise SteerError(f"{name} has no option {key!r}; its options are {', '.join(by_flag)}")
        kw[field] = value
    return options_of(steerer, SteerSettings(1, 1.0, None, 1, 1, options=steerer.Options(**kw)))


def options_record(opts) -> dict:
    """The options as ``{flag name: value}`` (``lambda``, not the field name ``lam``), JSON-ready."""
    if opts is None:
        return {}
    return {flag_name(f)[len("--steer-"):].replace("-", "_"): getattr(opts, f.name) for f in dataclasses.fields(opts)}


def reward_function(spec: str, cfg, trained: bool):
    """The score function ``(images (N, 3, H, W) in [0, 1], prompts) -> (N,)`` of one ``--rewards`` spec: ``train``
    is the run's held-out reward, any other spec its absolute score; differentiable in the images when the reward
    model is."""
    from ..eval.heldout import differentiable_training_reward
    from ..eval.scoring import load_rewards

    reward = load_rewards([spec], cfg, trained, None)[0]
    model = reward.model
    device = next(model.parameters()).device
    if spec == "train":
        return lambda images, prompts: differentiable_training_reward(model, images.to(device), prompts, cfg)
    return lambda images, prompts: model.score_texts(model.encode_images(images.to(device)), prompts).float().cpu()


def steer_with(name: str, adapter, score_fn, spec: str, prompts: list[str], seeds: list[int], s: SteerSettings,
               progress: bool, label: str):
    """Run steerer ``name`` with settings ``s`` under a progress bar over its NFE; the result records the reward
    spec and the options. The run uses a copy of ``s`` whose ``on_step`` ticks the bar: ``s`` itself is unchanged."""
    from ..progress import bar
    from .registry import STEERERS

    steerer = STEERERS[name]
    with bar(steerer.nfe(len(prompts), s), f"{label}: {name}", progress, unit="NFE",
             postfix=f"{len(prompts)} images") as b:
        result = steerer.run(adapter, score_fn, prompts, seeds, dataclasses.replace(s, on_step=b.update))
    result.extra["reward_spec"] = spec
    result.extra["options"] = options_record(s.options)
    return result
