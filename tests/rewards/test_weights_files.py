"""One guarded reader for every reward weights file (issue 16, item 8).

A ``.pt`` / ``.pth`` / ``.bin`` holding pickled code, as ``reward.path`` of hpsv2, imagereward, aesthetic and
aesthetic-v25, ends in one line naming the file and the fix (a safetensors copy, or a state dict of tensors only),
exit status 2; the code never runs and the message never suggests ``weights_only=False``. A truncated, corrupt or
non-state-dict file gets one line too. A scan of the source checks that reward modules read weights files only
through :func:`directalign.rewards.loading.load_weights_file`.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from directalign.cli import main
from directalign.rewards.loading import WeightsFileError, load_weights_file

SRC = Path(__file__).resolve().parents[2] / "src" / "directalign"
FAST = ["train.steps=1", "train.batch_size=1", "srpo.rollout_steps=2", "srpo.grid_points=40", "srpo.window_margin=2",
        "eval.before=false", "run.progress=false", "train.lora_rank=4", "run.report=false"]


class Payload:
    """Unpickling this runs ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _poisoned(path: Path, marker: Path) -> Path:
    torch.save({"layers.0.weight": torch.zeros(2), "extra": Payload(marker)}, path)
    return path


def _one_line_error(argv, capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("directalign: error: "), err
    return lines[0]


@pytest.mark.parametrize("kind, name", [("hpsv2", "HPS_v2.1_compressed.pt"), ("imagereward", "ImageReward.pt"),
                                        ("aesthetic", "sac+logos+ava1-l14-linearMSE.pth"),
                                        ("aesthetic-v25", "aesthetic_predictor_v2_5.pth"), ("hpsv2", "model.bin")])
def test_a_weights_file_with_code_is_one_line_naming_the_file_and_the_fix(kind, name, tmp_path, random_world,
                                                                           capsys):
    marker = tmp_path / "marker"
    bad = _poisoned(tmp_path / name, marker)
    siglip = tmp_path / "siglip"  # only its config.json is read before the head is refused
    siglip.mkdir()
    (siglip / "config.json").write_text(json.dumps({"model_type": "siglip_vision_model"}))
    sets = FAST + [f"run.output_dir={tmp_path / 'run'}", f"reward.kind={kind}", f"reward.path={bad}",
                   "reward.form=absolute", f"reward.tokenizer={random_world / 'reward'}",
                   f"reward.clip_backbone={random_world / 'reward'}", f"reward.siglip_backbone={siglip}"]
    argv = ["train"] + [a for s in sets for a in ("--set", s)]
    line = _one_line_error(argv, capsys)
    assert str(bad) in line and "refused, nothing in it ran" in line and ".safetensors" in line, line
    assert "weights_only=False" not in line and "weights_only" not in line
    assert not marker.exists(), "pickled code ran"
    assert not (tmp_path / "run").exists()


def test_every_kind_of_broken_file_is_one_line(tmp_path):
    marker = tmp_path / "marker"
    cases = {"code.pt": "refused, nothing in it ran", "gone.pt": "does not exist", "garbage.pt": "not a readable",
             "truncated.pt": "truncated or corrupt", "tensor.pt": "not a state dict", "bad.safetensors": "not a "
             "readable safetensors file", "empty.pt": "not a readable"}
    _poisoned(tmp_path / "code.pt", marker)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"w": torch.ones(100)}, tmp_path / "full.pt")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "full.pt").read_bytes()[:200])
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    save_file({"w": torch.ones(100)}, str(tmp_path / "full.safetensors"))
    (tmp_path / "bad.safetensors").write_bytes((tmp_path / "full.safetensors").read_bytes()[:50])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name, needle in cases.items():
        with pytest.raises(WeightsFileError) as e:
            load_weights_file(tmp_path / name)
        msg = str(e.value)
        assert name in msg and needle in msg and "\n" not in msg and "weights_only" not in msg, (name, msg)
    with pytest.raises(WeightsFileError, match="is a directory"):
        load_weights_file(tmp_path)
    assert not marker.exists()
    assert torch.equal(load_weights_file(tmp_path / "full.pt")["w"], torch.ones(100))
    assert torch.equal(load_weights_file(tmp_path / "full.safetensors")["w"], torch.ones(100))


def test_generator_weights_with_code_name_the_fix_too(tmp_path, random_world):
    """The other ``.bin`` reader: diffusers under load_adapter (torch refuses the pickle; the line says what to do)."""
    import shutil

    from directalign.adapters.loading import load_adapter
    from directalign.config import build_config
    from directalign.errors import TrainingError

    marker = tmp_path / "marker"
    gen = tmp_path / "generator"
    shutil.copytree(random_world / "generator", gen)
    for f in (gen / "transformer").glob("*.safetensors*"):
        f.unlink()
    torch.save({"proj_out.weight": Payload(marker)}, gen / "transformer" / "diffusion_pytorch_model.bin")
    with pytest.raises(TrainingError) as e:
        load_adapter(build_config({}, [f"model.path={gen}"]).model, torch.device("cpu"), torch.float32)
    msg = str(e.value)
    assert "diffusion_pytorch_model.bin" in msg and "refused, nothing in it ran" in msg and "safetensors" in msg
    assert "weights_only" not in msg and "\n" not in msg
    assert not marker.exists()


def test_reward_modules_read_weights_files_only_through_the_guarded_reader():
    offenders = []
    for f in sorted((SRC / "rewards").glob("*.py")):
        if f.name == "loading.py":
            continue
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("load", "load_file", "safe_open") and \
                    isinstance(node.value, ast.Name) and node.value.id in ("torch", "safetensors"):
                offenders.append(f"{f.name}:{node.lineno}")
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("safetensors"):
                offenders.append(f"{f.name}:{node.lineno} (imports {node.module})")
    assert not offenders, offenders
