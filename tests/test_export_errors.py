"""A full disk during export is one line naming the export directory; the checkpoints stay (issue 16, item 9).

safetensors reports ENOSPC as ``SafetensorError("Error while serializing: I/O error: No space left on device (os
error 28)")`` (the text it gives on a real full tmpfs); Python's own writes as ``OSError(ENOSPC)``. The write is made
to fail by replacing ``safetensors.torch.save_file``, which diffusers' ``save_pretrained`` / ``save_lora_weights``
call and the checkpoint writer does not (it holds its own reference).
"""

from __future__ import annotations

import errno

import pytest
import safetensors.torch
import torch
from helpers import tiny_config
from safetensors import SafetensorError

from directalign.adapters.loading import load_adapter
from directalign.cli import main
from directalign.engine.finetune import apply_finetune_mode
from directalign.export import ExportError, export_weights

ENOSPC_TEXT = "Error while serializing: I/O error: No space left on device (os error 28)"


def _full_disk(monkeypatch, error):
    def save_file(*_a, **_k):
        raise error

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("finetune", ["lora", "full"])
@pytest.mark.parametrize("error", [SafetensorError(ENOSPC_TEXT), OSError(errno.ENOSPC, "No space left on device")],
                         ids=["safetensors", "oserror"])
def test_a_full_disk_during_export_is_one_line(finetune, error, tmp_path, random_world, monkeypatch):
    cfg = tiny_config("srpo", f"train.finetune={finetune}")
    adapter = load_adapter(cfg.model, torch.device("cpu"), torch.float32)
    apply_finetune_mode(cfg.train, adapter)
    run = tmp_path / "run"
    (run / "checkpoints" / "step-00000001").mkdir(parents=True)
    kept = run / "checkpoints" / "step-00000001" / "trainable.safetensors"
    kept.write_bytes(b"checkpoint")
    _full_disk(monkeypatch, error)
    with pytest.raises(ExportError) as e:
        export_weights(cfg, adapter, run / "export")
    msg = str(e.value)
    assert "\n" not in msg and "the disk is full" in msg and str(run / "export") in msg
    assert "checkpoints" in msg and "--resume" in msg
    assert not (run / "export").exists(), "a half-written export was left behind"
    assert kept.read_bytes() == b"checkpoint"


def test_another_write_failure_is_one_line_too(tmp_path, random_world, monkeypatch):
    cfg = tiny_config("srpo")
    adapter = load_adapter(cfg.model, torch.device("cpu"), torch.float32)
    apply_finetune_mode(cfg.train, adapter)
    _full_disk(monkeypatch, SafetensorError("Error while serializing: I/O error: Permission denied (os error 13)"))
    with pytest.raises(ExportError, match=r"could not write the exported weights to .*export.*Permission denied"):
        export_weights(cfg, adapter, tmp_path / "export")


@pytest.mark.slow  # two tiny runs with their evaluations (~40 s on 2 cores)
def test_train_through_the_cli_then_resume_exports(tmp_path, random_world, monkeypatch, capsys):
    """One stderr line, exit 2, the final checkpoint intact; ``--resume`` once there is space exports."""
    run = tmp_path / "run"
    sets = ["train.steps=1", "train.batch_size=1", "srpo.rollout_steps=2", "srpo.grid_points=40",
            "srpo.window_margin=2", "eval.before=false", "run.progress=false", "train.lora_rank=4", "eval.seeds=[0]",
            "eval.steps=2", "eval.best_of=1", "run.report=false", f"run.output_dir={run}"]
    argv = ["train"] + [a for s in sets for a in ("--set", s)]
    with monkeypatch.context() as mp:
        _full_disk(mp, SafetensorError(ENOSPC_TEXT))
        code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in out + err, err
    assert err.strip().splitlines() == [err.strip()] and "the disk is full" in err and str(run / "export") in err
    assert (run / "checkpoints" / "step-00000001" / "trainable.safetensors").is_file()
    assert not (run / "export").exists()
    assert main(argv + ["--resume"]) == 0
    assert (run / "export" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run / "summary.json").is_file()
