"""What a ``--model`` spec names, and loading it.

* ``tiny-world`` -- the shipped tiny world; ``base`` -- the base model of the settings config (the tiny world without
  one);
* a run directory (holds ``config.yaml``) -- the run's base model with its exported weights: the LoRA in
  ``export/lora`` (``pipe.load_lora_weights``), else the transformer in ``export/transformer``;
* an exported transformer directory (``config.json`` of a FLUX, SD3 or Qwen-Image transformer) or a LoRA directory
  (``*lora*.safetensors``), applied to ``--base`` (default: the config's model, else the tiny world); the
  transformer's class must be the base's;
* a diffusers pipeline directory (``model_index.json``, its family comes from the index) or a hub id.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from . import EvalError


@dataclass
class ModelRef:
    spec: str  # as the user gave it
    kind: str  # tiny-world | base | run | pipeline | transformer | lora
    label: str  # short name for tables
    base: str  # the base model path as in model.path ("tiny-world", a directory or a hub id)
    path: str = ""  # the resolved directory of the model itself ("" for the bare base models)
    run_dir: Path | None = None
    cfg: object = None  # the run's Config for run directories

    @property
    def is_world(self) -> bool:
        return self.base == "tiny-world"

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "label": self.label, "base": self.base, "path": self.path}


def _is_transformer_dir(p: Path) -> bool:
    cfg = p / "config.json"
    if not cfg.is_file():
        return False
    try:
        return "Transformer" in str(json.loads(cfg.read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return False


def resolve_model(spec: str, settings_cfg=None, base: str | None = None, arg: str = "--model",
                  eval_dirs: bool = False) -> ModelRef:
    """What ``spec`` names (nothing is loaded). ``base`` is the base for bare transformer / LoRA directories.
    Errors name ``spec`` as the argument ``arg`` the user gave it with (``--model``, ``--baseline``, a positional
    ``MODEL`` of ``compare``) and, with ``eval_dirs``, list eval output directories among what it may be."""
    from ..config import load_run_config

    also = ", an eval output directory (aggregate.json)" if eval_dirs else ""

    if spec == "tiny-world":
        return ModelRef(spec, "tiny-world", "tiny-world", "tiny-world")
    if spec == "base":
        b = settings_cfg.model.path if settings_cfg is not None else "tiny-world"
        return ModelRef(spec, "base", "base", b)
    p = Path(spec).expanduser()
    if p.is_dir():
        label = p.resolve().name
        if (p / "config.yaml").is_file():
            cfg = load_run_config(p / "config.yaml")
            if not (p / "export" / "lora").is_dir() and not (p / "export" / "transformer").is_dir():
                raise EvalError(f"run {spec!r} has no export/lora or export/transformer; it has not finished "
                                "training (continue it with `directalign train --resume`)")
            return ModelRef(spec, "run", label, cfg.model.path, str(p.resolve()), p.resolve(), cfg)
        if (p / "model_index.json").is_file():
            return ModelRef(spec, "pipeline", label, str(p.resolve()), str(p.resolve()))
        b = base or (settings_cfg.model.path if settings_cfg is not None else "tiny-world")
        if _is_transformer_dir(p):
            return ModelRef(spec, "transformer", label, b, str(p.resolve()))
        if any(p.glob("*lora*.safetensors")):
            return ModelRef(spec, "lora", label, b, str(p.resolve()))
        raise EvalError(f"{arg} {spec!r} is not a run directory (config.yaml), a diffusers pipeline "
                        f"(model_index.json), an exported transformer (config.json){also} or a LoRA directory")
    if p.exists():
        raise EvalError(f"{arg} {spec!r} is a file; give a run directory, a model directory{also}, 'base' or "
                        "'tiny-world'")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise EvalError(f"{arg} {spec!r} does not exist; give a run directory, a model directory{also}, 'base' or "
                        "'tiny-world'")
    return ModelRef(spec, "pipeline", spec.split("/")[-1], spec, spec)  # a hub id


def load_model(ref: ModelRef, cfg):
    """The adapter of the model's family for ``ref`` with the dtype and device of ``cfg.model``."""
    from .. import source_images
    from ..adapters.loading import family_of_dir, load_adapter
    from ..engine.finetune import DTYPES, resolve_device

    c = copy.deepcopy(cfg)
    c.model.path = ref.base
    if ref.kind in ("pipeline", "transformer", "lora"):  # a local base directory says which family it is
        c.model.family = family_of_dir(Path(ref.base).expanduser()) or c.model.family
    device = resolve_device(c.model.device)
    adapter = load_adapter(c.model, device, DTYPES[c.model.dtype])
    source_images.attach(adapter, source_images.for_config(c, training=False))  # an edit family's sources
    if ref.kind == "run":
        lora, trans = ref.run_dir / "export" / "lora", ref.run_dir / "export" / "transformer"
        if lora.is_dir() and any(lora.glob("*.safetensors")):
            apply_lora(adapter, lora, ref.cfg)
        else:
            apply_transformer(adapter, trans)
    elif ref.kind == "transformer":
        apply_transformer(adapter, Path(ref.path))
    elif ref.kind == "lora":
        apply_lora(adapter, Path(ref.path), None)
    adapter.transformer.eval()
    return adapter


def apply_lora(adapter, lora_dir: Path, run_cfg) -> None:
    """Load the LoRA in ``lora_dir`` into the adapter's pipeline, at the run's alpha / rank scale when known."""
    try:
        adapter.pipe.load_lora_weights(str(lora_dir), adapter_name="directalign",
                                       **getattr(adapter, "lora_load_kwargs", {}))  # wan: the low expert's slot
    except (OSError, ValueError, KeyError) as e:
        raise EvalError(f"could not load the LoRA in {str(lora_dir)!r}: {str(e).splitlines()[0]}") from None
    # Older exports hold no alpha, and diffusers then loads alpha = rank; restore the run's alpha / rank scale.
    if run_cfg is not None:
        want = run_cfg.train.lora_alpha / run_cfg.train.lora_rank
        have = next((m.scaling["directalign"] for m in adapter.transformer.modules()
                     if isinstance(getattr(m, "scaling", None), dict) and "directalign" in m.scaling), want)
        if abs(have - want) > 1e-9 * max(1.0, abs(want)):
            adapter.pipe.set_adapters(["directalign"], adapter_weights=[want / have])


def apply_transformer(adapter, path: Path) -> None:
    """Replace the adapter's transformer by the exported one in ``path`` (which must be of the same class)."""
    cls = type(adapter.transformer)
    try:
        saved = json.loads((path / "config.json").read_text()).get("_class_name", "")
    except (OSError, ValueError):
        saved = ""
    if saved and saved != cls.__name__:
        raise EvalError(f"the transformer in {str(path)!r} is a {saved}, but the base model's is a {cls.__name__}; "
                        "pass --base (or the run's config) with the model it was trained from")
    try:
        t = cls.from_pretrained(str(path), torch_dtype=adapter.dtype)
    except (OSError, ValueError, TypeError) as e:
        raise EvalError(f"could not load the transformer in {str(path)!r}: {str(e).splitlines()[0]}") from None
    slot = getattr(adapter, "transformer_slot", "transformer")  # wan 2.2: the low expert lives in transformer_2
    setattr(adapter.pipe, slot, t.to(adapter.device).requires_grad_(False))
