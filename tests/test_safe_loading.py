"""Loading never executes pickled code.

A malicious pickle (``__reduce__`` that would create a marker file) is fed as a checkpoint's ``optimizer.pt`` /
``rng.pt`` / ``lr_scheduler.pt``, as a reward checkpoint and as generator weights: each is refused with a clear
error and the marker never appears. A scan of the source checks every ``torch.load`` passes ``weights_only=True``
and nothing passes ``trust_remote_code=True`` or unpickles in another way.
"""

from __future__ import annotations

import ast
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from directalign.cli import main
from directalign.engine import checkpoint as ckpt
from directalign.rewards.clip import CLIPReward

SRC = Path(__file__).resolve().parents[1] / "src" / "directalign"
FAST = ["train.steps=2", "train.batch_size=1", "srpo.rollout_steps=2", "srpo.grid_points=40",
        "srpo.window_margin=2", "eval.before=false", "run.progress=false", "train.lora_rank=4", "run.report=false"]


class Payload:
    """Unpickling this runs ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _write_malicious(path: Path, marker: Path, fmt: str) -> None:
    obj = {"state": {0: Payload(marker)}, "param_groups": []}
    if fmt == "torch.save":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    # the payload is real: plain pickle would run it
    probe = marker.with_name(marker.name + ".probe")
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()
    probe.unlink()


def _sets(items) -> list[str]:
    out = []
    for s in items:
        out += ["--set", s]
    return out


def _checkpoint(root: Path) -> Path:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return ckpt.save_checkpoint(root, 1, {"w": torch.ones(2)}, opt, sched, {})


@pytest.mark.parametrize("fmt", ["torch.save", "raw-pickle"])
@pytest.mark.parametrize("name", ["optimizer.pt", "rng.pt", "lr_scheduler.pt"])
def test_malicious_pickle_in_checkpoint_is_refused(tmp_path, monkeypatch, name, fmt):
    # even with the environment asking torch to unpickle freely, the explicit weights_only=True wins
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "marker"
    path = _checkpoint(tmp_path / "ck")
    _write_malicious(path / name, marker, fmt)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(path)
    msg = str(e.value)
    assert name in msg and "refused" in msg and "\n" not in msg
    assert not marker.exists(), "pickled code ran"


@pytest.fixture
def run_with_checkpoint(random_world, tmp_path):
    run = tmp_path / "run"
    assert main(["train", *_sets(FAST + [f"run.output_dir={run}"]), "--max-steps-this-session", "1"]) == 0
    return run


def _user_error(capsys, argv) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("directalign: error: "), err
    return lines[-1]


def test_resume_refuses_a_poisoned_checkpoint(run_with_checkpoint, tmp_path, capsys):
    run = run_with_checkpoint
    marker = tmp_path / "marker"
    _write_malicious(run / "checkpoints" / "step-00000001" / "optimizer.pt", marker, "torch.save")
    capsys.readouterr()
    line = _user_error(capsys, ["train", *_sets(FAST + [f"run.output_dir={run}"]), "--resume"])
    assert "optimizer.pt" in line and "refused" in line
    assert not marker.exists(), "pickled code ran"


def _poisoned_reward(src: Path, dest: Path, marker: Path) -> Path:
    shutil.copytree(src, dest)
    (dest / "model.safetensors").unlink()
    torch.save({"text_projection.weight": Payload(marker)}, dest / "pytorch_model.bin")
    return dest


def test_clip_reward_refuses_pickled_code(random_world, tmp_path):
    marker = tmp_path / "marker"
    bad = _poisoned_reward(random_world / "reward", tmp_path / "reward", marker)
    with pytest.raises(ValueError, match="refused"):
        CLIPReward.from_pretrained(bad)
    assert not marker.exists(), "pickled code ran"


def test_training_refuses_a_poisoned_reward(random_world, tmp_path, capsys):
    marker = tmp_path / "marker"
    bad = _poisoned_reward(random_world / "reward", tmp_path / "reward", marker)
    line = _user_error(capsys, ["train", *_sets(FAST + [f"run.output_dir={tmp_path / 'run'}", "reward.kind=clip",
                                                       f"reward.path={bad}"])])
    assert "reward.path" in line
    assert not marker.exists(), "pickled code ran"
    assert not (tmp_path / "run").exists()


def test_training_refuses_a_poisoned_tiny_world_reward(random_world, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "marker"
    world = tmp_path / "world"
    shutil.copytree(random_world / "generator", world / "generator")
    _poisoned_reward(random_world / "reward", world / "reward", marker)
    monkeypatch.setenv("DIRECTALIGN_WORLD_DIR", str(world))
    _user_error(capsys, ["train", *_sets(FAST + [f"run.output_dir={tmp_path / 'run'}"])])
    assert not marker.exists(), "pickled code ran"


def test_training_refuses_poisoned_generator_weights(random_world, tmp_path):
    """In a subprocess: diffusers logs its own line about the missing safetensors file before refusing the pickle
    (and, in-process, pytest's captured streams turn that log call into a logging traceback)."""
    marker = tmp_path / "marker"
    gen = tmp_path / "generator"
    shutil.copytree(random_world / "generator", gen)
    for f in (gen / "transformer").glob("*.safetensors"):
        f.unlink()
    torch.save({"proj_out.weight": Payload(marker)}, gen / "transformer" / "diffusion_pytorch_model.bin")
    env = dict(os.environ, PYTHONPATH=str(SRC.parent), DIRECTALIGN_WORLD_DIR=str(random_world), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    argv = [sys.executable, "-m", "directalign", "train",
            *_sets(FAST + [f"run.output_dir={tmp_path / 'run'}", f"model.path={gen}"])]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("directalign: error: ") and "model.path" in last, proc.stderr
    assert not marker.exists(), "pickled code ran"
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------ source scan
def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func) -> str:
    """Dotted name of a call target: ``torch.load``, ``eval``; ``?.eval`` for a method of an expression."""
    if isinstance(func, ast.Attribute):
        return f"{_name(func.value)}.{func.attr}"
    if isinstance(func, ast.Name):
        return func.id
    return "?"


def _kw(call: ast.Call, key: str):
    for k in call.keywords:
        if k.arg == key:
            return k.value
    return None


def test_source_never_unpickles_or_trusts_remote_code():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    problems = []
    for f in files:
        text = f.read_text(encoding="utf-8")
        where = f.relative_to(SRC.parent)
        if "trust_remote_code=True" in text.replace(" ", ""):
            problems.append(f"{where}: trust_remote_code=True")
        for call in _calls(ast.parse(text)):
            name = _name(call.func)
            line = f"{where}:{call.lineno}"
            if name == "torch.load":
                wo = _kw(call, "weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{line}: torch.load without weights_only=True")
            if name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "dill.loads", "joblib.load",
                        "cloudpickle.load", "cloudpickle.loads", "marshal.loads", "eval", "exec", "yaml.load",
                        "yaml.unsafe_load", "yaml.full_load"):
                problems.append(f"{line}: {name}")
            trc = _kw(call, "trust_remote_code")
            if trc is not None and not (isinstance(trc, ast.Constant) and trc.value is False):
                problems.append(f"{line}: trust_remote_code={ast.unparse(trc)}")
            ap = _kw(call, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                problems.append(f"{line}: allow_pickle={ast.unparse(ap)}")
    assert not problems, "\n".join(problems)
