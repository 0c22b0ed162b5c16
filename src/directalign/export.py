"""Export trained weights in diffusers formats.

* LoRA runs: ``export/lora/pytorch_lora_weights.safetensors``, loadable with ``FluxPipeline.load_lora_weights``;
* every run: ``export/transformer/`` with the merged (or fully fine-tuned) transformer, loadable with
  ``FluxTransformer2DModel.from_pretrained``.

A write that fails (a full disk: ``OSError`` ENOSPC, or safetensors' ``SafetensorError`` wrapping it) is one
:class:`ExportError` line naming the export directory; the half-written export is removed and the run's checkpoints,
written before, are left as they are.
"""

from __future__ import annotations

import copy
import errno
import shutil
from pathlib import Path

from .errors import UserError


class ExportError(UserError, OSError):
    """The trained weights could not be written; the checkpoints are intact, the message says what to do."""


def _disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    # safetensors reports the OS error inside its own message: "I/O error: No space left on device (os error 28)"
    return any(s in text for s in ("No space left", "os error 28", "StorageFull", "Disk quota exceeded",
                                   "os error 122"))


def export_weights(cfg, adapter, out_dir: Path) -> dict[str, Path]:
    """Write the export (see the module docstring); returns ``{"lora": dir, "transformer": dir}`` (lora for LoRA
    runs). A failed write raises :class:`ExportError`."""
    from safetensors import SafetensorError

    out_dir = Path(out_dir)
    try:
        return _export(cfg, adapter, out_dir)
    except (OSError, SafetensorError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _disk_full(e):
            raise  # torch.save reports a full disk as RuntimeError; anything else is not a write failure
        shutil.rmtree(out_dir, ignore_errors=True)  # a half-written export must not pass for a complete one
        checkpoints = out_dir.parent / "checkpoints"
        kept = (f"; the checkpoints in {str(checkpoints)!r} are intact: run the same command with --resume to "
                "export again" if checkpoints.is_dir() else "")
        if _disk_full(e):
            raise ExportError(f"the disk is full: could not write the exported weights to {str(out_dir)!r}; free "
                              f"some space{kept}") from None
        reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e)
                  else type(e).__name__)
        raise ExportError(f"could not write the exported weights to {str(out_dir)!r} ({reason}); fix that{kept}") \
            from None


def _export(cfg, adapter, out_dir: Path) -> dict[str, Path]:
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
