"""Which adapter serves which ``model.family``, and one-line checks of a model path before any weight loads.

``check_model_dir`` reads ``model_index.json`` and names, in one line, what is wrong before any weight is loaded:
a pipeline of another family, or a component (transformer, VAE, a text encoder or tokenizer, the scheduler) whose
folder or weights are missing. ``Family.resolution_multiple`` says which heights and widths a family can generate,
from the VAE's ``config.json`` alone: the VAE downsamples by 2 per level and the transformer packs 2x2 latent patches
(as the diffusers pipelines compute ``vae_scale_factor``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import TrainingError
from ..hub import clean_message, refused_pickle


@dataclass(frozen=True)
class Family:
    name: str
    pipeline: str  # diffusers pipeline class name in model_index.json
    adapter: str  # "module:Class" under directalign.adapters
    components: tuple[str, ...]  # what the adapter needs
    # the VAE's downsampling factor is 2 ** (len(vae_config[vae_levels_key]) - vae_levels_offset) ...
    vae_levels_key: str = "block_out_channels"
    vae_levels_offset: int = 1
    vae_factor: int = 8  # ... or this (the published models') when the VAE config is not at hand
    patch: int = 2  # the transformer's latent patch (2x2 packing)

    def resolution_multiple(self, vae_config: dict | None = None) -> int:
        """Height and width must be multiples of this: the VAE factor (from ``vae_config``, the VAE's config.json,
        when given) times the latent patch."""
        levels = (vae_config or {}).get(self.vae_levels_key)
        factor = 2 ** (len(levels) - self.vae_levels_offset) if isinstance(levels, list) and levels else self.vae_factor
        return max(1, factor) * self.patch

    def adapter_class(self):
        import importlib

        module, cls = self.adapter.split(":")
        return getattr(importlib.import_module(f"directalign.adapters.{module}"), cls)


FAMILIES: dict[str, Family] = {
    "flux": Family("flux", "FluxPipeline", "flux:FluxAdapter",
                   ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")),
    "sd3": Family("sd3", "StableDiffusion3Pipeline", "sd3:SD3Adapter",
                  ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                   "text_encoder_3", "tokenizer_3", "scheduler")),
    "qwen-image": Family("qwen-image", "QwenImagePipeline", "qwen_image:QwenImageAdapter",
                         ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
                         vae_levels_key="temperal_downsample", vae_levels_offset=0),
    **{name: Family(name, pipe, f"qwen_image_edit:{cls}", ("transformer", "vae", "text_encoder", "tokenizer",
                    "scheduler"), vae_levels_key="temperal_downsample", vae_levels_offset=0)
       for name, pipe, cls in (("qwen-image-edit", "QwenImageEditPipeline", "QwenImageEditAdapter"),
                               ("qwen-image-edit-plus", "QwenImageEditPlusPipeline", "QwenImageEditPlusAdapter"))},
    "z-image": Family("z-image", "ZImagePipeline", "z_image:ZImageAdapter",
                      ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")),
    "wan": Family("wan", "WanPipeline", "wan:WanAdapter", ("transformer", "vae", "text_encoder", "tokenizer",
                  "scheduler"), vae_levels_key="temperal_downsample", vae_levels_offset=0),
    "flux2": Family("flux2", "Flux2Pipeline", "flux2:Flux2Adapter",
                    ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")),
    "flux2-klein": Family("flux2-klein", "Flux2KleinPipeline", "flux2:Flux2KleinAdapter",
                          ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")),
}
_FAMILY_OF_PIPELINE = {f.pipeline: f.name for f in FAMILIES.values()}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json", ".pt", ".pth")


def _has_weights(folder: Path) -> bool:
    return any(f.name.endswith(_WEIGHT_SUFFIXES) for f in folder.iterdir() if f.is_file())


def family_of_dir(path: str | Path) -> str | None:
    """The ``model.family`` of a local diffusers directory from its ``model_index.json`` (None if unknown)."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return _FAMILY_OF_PIPELINE.get(index.get("_class_name", "")) if isinstance(index, dict) else None


def check_model_dir(path: str | Path, family: str) -> None:
    """Raise ``ValueError`` with one line naming the problem if ``path`` cannot serve ``family``."""
    fam = FAMILIES[family]
    root = Path(path)
    index_file = root / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ValueError(f"{root} has no readable model_index.json; give a diffusers directory saved with "
                         "save_pretrained") from None
    cls = index.get("_class_name", "")
    other = _FAMILY_OF_PIPELINE.get(cls)
    if other and other != family:
        raise ValueError(f"{root} holds a {cls} (model.family={other}), but model.family={family}; set "
                         f"model.family={other}")
    missing = []
    for name in fam.components:
        entry = index.get(name)
        folder = root / name
        if not entry or entry[0] is None or not folder.is_dir():
            missing.append(name)
        elif name.startswith(("tokenizer", "scheduler")):
            if not any(folder.iterdir()):
                missing.append(name)
        elif not (folder / "config.json").is_file() or not _has_weights(folder):
            missing.append(f"{name} (no config.json or weights)")
    if missing:
        raise ValueError(f"{root} is missing what a {fam.pipeline} needs: {', '.join(missing)}")


def vae_config(model_dir: str | Path | None) -> dict | None:
    """The VAE's config.json of a diffusers directory (None when absent or unreadable)."""
    if model_dir is None:
        return None
    try:
        data = json.loads((Path(model_dir) / "vae" / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_tiny_world_family(model_cfg) -> None:
    if model_cfg.path == "tiny-world" and model_cfg.family != "flux":
        raise TrainingError(f"model.path=tiny-world is a FLUX-family model, but model.family={model_cfg.family}; "
                            "set model.family=flux or point model.path at a model of that family")


def check_local_model(path: str | Path, family: str, key: str = "model.path") -> Path:
    """A local diffusers directory that can serve ``family`` (its expanded path), or a one-line
    :class:`TrainingError` naming ``key`` and the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        raise TrainingError(f"{key} {str(path)!r} does not exist; give a diffusers model directory (saved with "
                            "save_pretrained) or a hub id")
    if not (p / "model_index.json").is_file():
        raise TrainingError(f"{key} {str(path)!r} is not a diffusers model directory (no model_index.json); "
                            "give a directory saved with save_pretrained or a hub id")
    try:
        check_model_dir(p, family)
    except ValueError as e:
        raise TrainingError(f"{key}: {e}") from None
    return p


def load_adapter(model_cfg, device, dtype):
    """The generator of ``model.family`` (a registered family) from ``model.path`` (tiny-world, a hub id or a local
    diffusers directory), in ``dtype`` on ``device``; a path that cannot serve is a one-line :class:`TrainingError`."""
    m = model_cfg
    path = m.path
    if path == "tiny-world":
        check_tiny_world_family(m)
        from ..world.load import load_pipeline
        from .flux import FluxAdapter

        return FluxAdapter(load_pipeline(dtype).to(device), m.max_sequence_length or None)
    family = FAMILIES[m.family]
    p = Path(path).expanduser()
    if path.startswith((".", "/", "~")) or p.exists():
        path = str(check_local_model(path, m.family))
    try:
        adapter = family.adapter_class().from_pretrained(path, dtype=dtype, device=str(device),
                                                         max_sequence_length=m.max_sequence_length or None)
        return adapter.configure(m) if hasattr(adapter, "configure") else adapter  # video fields (wan)
    except (OSError, ValueError) as e:
        if refused_pickle(e):  # a .bin / .pt holding pickled code: torch refused it, nothing ran
            raise TrainingError(f"could not load model.path {path!r} as a {family.pipeline}: {clean_message(e)} "
                                "(it holds pickled Python objects besides tensors: refused, nothing in it ran); give "
                                "a copy saved as safetensors (save_pretrained(..., safe_serialization=True))") from None
        raise TrainingError(f"could not load model.path {path!r} as a {family.pipeline}: "
                            f"{clean_message(e)}") from None
    except TypeError as e:  # diffusers builds the modules from config.json: a value of the wrong type lands here
        raise TrainingError(f"could not load model.path {path!r} as a {family.pipeline}: a value in one of its "
                            f"config.json files has the wrong type ({clean_message(e)}); fix that file or "
                            "re-save the model with save_pretrained") from None
