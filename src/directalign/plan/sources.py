"""Where the planner finds a model's ``config.json`` files, and the modules built from them on the meta device.

No weight is read or downloaded. ``model.path`` resolves to a folder laid out like a diffusers pipeline directory
(``model_index.json`` plus one ``<component>/config.json`` per component):

* ``tiny-world``: the embedded tiny world's own generator (``assets/tiny-world/generator``);
* a local diffusers directory: its own config files (the weights are never opened);
* a hub id listed in ``assets/plan-configs/index.json``: the config files shipped there, written from the published
  model cards (sources in ``assets/plan-configs/README.md``).

A new model family needs only such a folder and a line in ``index.json``: modules are built by the class their
config names (diffusers ``_class_name``, transformers ``architectures[0]``), under ``torch.device("meta")``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError

if TYPE_CHECKING:  # torch loads in build_meta: `directalign plan --help` lists the GPUs without it
    import torch


class PlanError(UserError, ValueError):
    """The planner cannot answer for this config; the one-line message names the key and the fix."""


def assets_dir() -> Path:
    return Path(str(resources.files("directalign"))) / "assets"


def plan_configs_dir() -> Path:
    return assets_dir() / "plan-configs"


def _index() -> dict:
    return json.loads((plan_configs_dir() / "index.json").read_text(encoding="utf-8"))


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PlanError(f"cannot read {path}: {e}; give a readable config.json") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path} does not hold a JSON object; give a model's config.json")
    return data


def model_dir(path: str) -> Path:
    """The folder of ``model.path``'s config files (see the module docstring)."""
    if path == "tiny-world":
        from ..world_paths import generator_dir

        return Path(generator_dir())
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "model_index.json").is_file():
            raise PlanError(f"model.path {path!r} has no model_index.json; give a diffusers model directory")
        return local
    known = _index()["models"]
    if path in known:
        return plan_configs_dir() / known[path]
    raise PlanError(f"model.path {path!r}: no config.json files known for it (known: {', '.join(sorted(known))}); "
                    "give a local diffusers directory or add its configs under assets/plan-configs")


def reward_dir(kind: str, path: str) -> Path | None:
    """The folder of the reward model's config.json (None: a reward kind the planner does not model)."""
    if kind == "tiny-world":
        from ..world_paths import reward_dir as tiny_reward_dir

        return Path(tiny_reward_dir())
    local = Path(path).expanduser()
    if local.is_dir() and (local / "config.json").is_file():
        return local
    known = _index()["rewards"]
    return plan_configs_dir() / known[kind] if kind in known else None


def component_config(folder: Path, name: str) -> dict | None:
    """``<folder>/<name>/config.json`` (None when the pipeline has no such component)."""
    f = folder / name / "config.json"
    return _read_json(f) if f.is_file() else None


def pipeline_components(folder: Path) -> dict[str, tuple[str, str]]:
    """``{component: (library, class)}`` of a ``model_index.json``, for the components that have weights."""
    index = _read_json(folder / "model_index.json")
    out = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[0] is None:
            continue
        if name.startswith(("tokenizer", "scheduler", "feature_extractor", "image_processor")):
            continue
        out[name] = (entry[0], entry[1])
    return out


def build_meta(config: dict, dtype: torch.dtype, class_name: str | None = None) -> torch.nn.Module:
    """A diffusers or transformers module of ``config`` with meta parameters (no memory, no weights)."""
    name = class_name or config.get("_class_name") or (config.get("architectures") or [None])[0]
    if not name:
        raise PlanError("a config.json names no class (_class_name or architectures); fix that file")
    import torch

    with torch.device("meta"):
        if "_class_name" in config:
            import diffusers

            cls = getattr(diffusers, name, None)
            if cls is None:
                raise PlanError(f"diffusers has no class {name!r} (named by a config.json); upgrade diffusers")
            module = cls.from_config(config)
        else:
            import transformers

            cls = getattr(transformers, name, None)
            if cls is None:
                raise PlanError(f"transformers has no class {name!r} (named by a config.json); upgrade transformers")
            cfg = transformers.AutoConfig.for_model(**config)
            module = cls._from_config(cfg)
    return module.to(dtype)


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


@dataclass
class Components:
    """The modules of a plan, on the meta device: the transformer, the VAE, the text encoders (by component name)
    and the reward model (None when not modelled)."""

    folder: Path
    transformer_config: dict
    vae_config: dict
    text_encoder_configs: dict[str, tuple[str, dict]]  # name -> (class, config)
    reward_folder: Path | None


def components(model_path: str, reward_kind: str, reward_path: str) -> Components:
    folder = model_dir(model_path)
    parts = pipeline_components(folder)
    transformer = component_config(folder, "transformer")
    vae = component_config(folder, "vae")
    if transformer is None or vae is None:
        raise PlanError(f"{folder} has no transformer/config.json or vae/config.json; the planner needs both")
    texts = {}
    for name, (_, cls) in parts.items():
        if name.startswith("text_encoder"):
            cfg = component_config(folder, name)
            if cfg is not None:
                texts[name] = (cls, cfg)
    return Components(folder, transformer, vae, texts, reward_dir(reward_kind, reward_path))
