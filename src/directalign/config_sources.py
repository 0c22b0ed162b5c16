"""Where each key of a resolved configuration comes from: the YAML file, a ``--set`` override, or the built-in default.

A YAML file need not list every key: :func:`directalign.config.load_config` fills the keys it leaves unset with the
defaults of the config dataclasses (:mod:`directalign.engine.config` and each method's section). Those defaults are
not the tiny job's: ``model``, ``reward``, ``eval`` and ``run`` describe the tiny world, but ``sampling``, ``train``
and the method's own section hold the FLUX.1-dev settings of the method's official code (for SRPO the script
``scripts/finetune/SRPO_training_hpsv2.sh`` of https://github.com/Tencent-Hunyuan/SRPO: 20 steps, batch 1, learning
rate 5e-6), so a partial YAML on the tiny world trains with FLUX's learning rate unless it says otherwise.
``directalign train --print-config`` therefore marks every key with its source (:func:`annotated_yaml`), and a run
from a partial YAML of the user's on the tiny world says which defaults differ from the shipped tiny job
(:func:`defaults_notice`).
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from .config import Config, load_config, packaged_config
from .engine.config import load_yaml, parse_override

COMMENT_COLUMN = 36
_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?: .*)?$")


def flatten(data, prefix: str = "") -> dict:
    """``{"a.b.c": value}`` of the leaves of a nested mapping (a ``None`` section counts as no keys)."""
    out = {}
    for key, value in (data or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def given_keys(path=None, overrides=()) -> dict[str, str]:
    """``{"a.b": source}`` of every key the YAML file (source: its file name) or an override (source ``--set``) sets;
    the keys of neither take the built-in defaults."""
    out = {key: Path(path).name for key in flatten(load_yaml(path))} if path else {}
    for text in overrides or ():
        out.update({key: "--set" for key in flatten(parse_override(text))})
    return out


def tiny_job(cfg: Config) -> tuple[str, Config] | None:
    """The shipped tiny-world config of ``cfg``'s method (``tiny-srpo`` for srpo, ...), when ``cfg`` trains the tiny
    world and one is shipped."""
    if cfg.model.path != "tiny-world":
        return None
    name = f"tiny-{cfg.method}"
    return (name, load_config(packaged_config(name))) if packaged_config(name).is_file() else None


def tiny_job_differences(cfg: Config, given: dict[str, str]) -> dict[str, tuple]:
    """``{"a.b": (value, tiny job's value)}`` of the keys left to the defaults whose default differs from the value
    of the method's shipped tiny-world job (empty unless ``cfg`` trains the tiny world)."""
    job = tiny_job(cfg)
    if job is None:
        return {}
    ours, theirs = flatten(cfg.to_dict()), flatten(job[1].to_dict())
    return {key: (value, theirs[key]) for key, value in ours.items()
            if key not in given and key in theirs and theirs[key] != value and not key.startswith("run.")}


def header(cfg: Config, path=None) -> str:
    """The comment block ``--print-config`` prints above the configuration."""
    job = tiny_job(cfg)
    text = (f"The resolved configuration. After each key, where it comes from: {Path(path).name if path else 'a file'}, "
            "--set, or default (set by neither). Defaults: model, reward and prompts are the tiny world's, but "
            f"sampling, train, eval's steps and guidance and the {cfg.section_name} section are FLUX.1-dev settings of "
            "the official code (train: SRPO's HPS script), NOT the tiny job's"
            + (f"; '{job[0]}: X' shows the tiny job's value X where it differs." if job else ".")
            + f" To start from a whole shipped job instead: directalign train --config tiny-{cfg.method} "
            "--print-config > my.yaml")
    return textwrap.fill(text, width=116, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False) + "\n"


def annotated_yaml(cfg: Config, path=None, overrides=()) -> str:
    """``cfg.to_yaml()`` with a header and, after every key, where it comes from (``# <file>``, ``# --set`` or
    ``# default``, plus the tiny job's value where a default differs from it). Loads back to the same config."""
    given = given_keys(path, overrides)
    leaves = flatten(cfg.to_dict())
    differs = tiny_job_differences(cfg, given)
    job = tiny_job(cfg)
    lines, stack = [], []
    for line in cfg.to_yaml().splitlines():
        m = _KEY_LINE.match(line)
        if not m:
            lines.append(line)
            continue
        depth = len(m["indent"]) // 2
        stack[depth:] = [m["key"]]
        key = ".".join(stack)
        if key not in leaves:
            lines.append(line)
            continue
        note = given.get(key, "default")
        if key in differs:
            note += f"; {job[0]}: {differs[key][1]}"
        lines.append(f"{line.ljust(COMMENT_COLUMN - 1)} # {note}")
    return header(cfg, path) + "\n".join(lines) + "\n"


def defaults_notice(cfg: Config, path=None, overrides=()) -> str | None:
    """One line for a run from a partial YAML of the user's (not a shipped config) on the tiny world whose defaulted
    keys differ from the shipped tiny job's; None otherwise."""
    if path is None or Path(path).resolve().parent == packaged_config("tiny-srpo").resolve().parent:
        return None
    differs = tiny_job_differences(cfg, given_keys(path, overrides))
    if not differs:
        return None
    job = tiny_job(cfg)[0]
    shown = ", ".join(f"{k}={v!r} ({job}: {t!r})" for k, (v, t) in list(differs.items())[:4])
    more = f" and {len(differs) - 4} more" if len(differs) > 4 else ""
    return (f"note: {Path(path).name} leaves keys unset; their built-in defaults are FLUX.1-dev's, not the tiny "
            f"job's: {shown}{more}; directalign train --config {path} --print-config marks every default")
