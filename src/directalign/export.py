"""Export trained weights in diffusers formats.

* LoRA runs: ``export/lora/pytorch_lora_weights.safetensors``, loadable with ``FluxPipeline.load_lora_weights``;
* every run: ``export/transformer/`` with the merged (or fully fine-tuned) transformer, loadable with
  ``FluxTransformer2DModel.from_pretrained``.
"""

from __future__ import annotations

import copy
from pathlib import Path


def export_weights(cfg, adapter, out_dir: Path) -> dict[str, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    transformer = adapter.transformer
    if cfg.train.finetune == "lora":
        from peft.utils import get_peft_model_state_dict

        lora_dir = out_dir / "lora"
        layers = get_peft_model_state_dict(transformer)
        # the adapter metadata carries lora_alpha; without it load_lora_weights assumes alpha = rank
        metadata = transformer.peft_config["default"].to_dict()
        type(adapter.pipe).save_lora_weights(lora_dir, transformer_lora_layers=layers, safe_serialization=True,
                                             transformer_lora_adapter_metadata=metadata)
        paths["lora"] = lora_dir
        merged = copy.deepcopy(transformer)
        merged.fuse_lora(lora_scale=1.0)
        merged.unload_lora()
        merged.save_pretrained(out_dir / "transformer")
    else:
        transformer.save_pretrained(out_dir / "transformer")
    paths["transformer"] = out_dir / "transformer"
    return paths
