"""Two processes on the gloo backend (CPU) against one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import closing
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from directalign.config import build_config
from directalign.training import train

# The slow tier: each test starts 2 training processes (torchrun / accelerate) on gloo.
pytestmark = pytest.mark.slow

SETTINGS = ["srpo.rollout_steps=2", "srpo.grid_points=40", "srpo.window_margin=2", "eval.before=false",
            "run.progress=false", "srpo.share_noise_across_ranks=false", "srpo.share_window_across_ranks=true",
            "train.learning_rate=1e-3", "train.grad_clip=0", "run.checkpoint_every=1", "train.steps=3",
            "run.keep_checkpoints=5",
            # Adam divides by sqrt(v) + eps: with the default 1e-8 a parameter whose gradient is rounding noise moves
            # by +-lr either way, so batch-order rounding between 1 and 2 processes would dominate the comparison
            "train.adam_eps=1e-3"]


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(cfg_path: Path, world_dir: Path, steps: int, resume: bool = False, launcher: str = "torchrun") -> None:
    env = dict(os.environ, DIRECTALIGN_WORLD_DIR=str(world_dir), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[2] / "src"), os.environ.get("PYTHONPATH", "")]))
    if launcher == "torchrun":
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                  "127.0.0.1", "--master_port", str(_free_port())]
    else:  # accelerate's multi-process launcher (it starts torchrun's workers, on CPU too)
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                  str(_free_port())]
    cmd = launch + ["-m", "directalign", "train", "--config", str(cfg_path),
                    "--max-steps-this-session", str(steps)] + (["--resume"] if resume else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def _weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors"))


def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("finetune,strategy,expected", [("lora", "auto", "replicate"), ("full", "auto", "fsdp"),
                                                         ("full", "replicate", "replicate")])
def test_two_processes_match_one_process_with_twice_the_batch(random_world, tmp_path, finetune, strategy, expected):
    one = tmp_path / "one"
    cfg1 = build_config({}, SETTINGS + [f"run.output_dir={one}", "train.batch_size=2", f"train.finetune={finetune}"])
    train(cfg1, log=lambda *_: None, max_steps_this_session=2)

    two = tmp_path / "two"
    # the FSDP2 run also checkpoints activations: sharding and recomputation must not change the numbers
    ckpt = ["train.gradient_checkpointing=true"] if expected == "fsdp" else []
    cfg2 = build_config({}, SETTINGS + ckpt + [f"run.output_dir={two}", "train.batch_size=1",
                                               f"train.finetune={finetune}", f"train.distributed={strategy}"])
    cfg_path = tmp_path / "two.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg2.to_dict()))
    _torchrun(cfg_path, random_world, steps=2)

    assert _losses(two) == pytest.approx(_losses(one), rel=1e-4, abs=1e-6)
    w1, w2 = _weights(one, 2), _weights(two, 2)
    assert w1.keys() == w2.keys()  # FSDP checkpoints hold whole tensors under the plain module's names
    base = load_file(str(one / "checkpoints" / "step-00000001" / "trainable.safetensors"))
    changed = [k for k in w1 if not torch.equal(w1[k], base[k])]
    assert changed, "training did not change any weight"
    for k in w1:
        assert w1[k].shape == w2[k].shape, k
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-6), k
    state = json.loads((two / "checkpoints" / "step-00000002" / "state.json").read_text())
    assert state["world_size"] == 2 and state["distributed"] == expected


@pytest.mark.parametrize("finetune", ["lora", "full"])
def test_two_process_resume_equals_uninterrupted(random_world, tmp_path, finetune):
    # full fine-tuning runs on FSDP2 and keeps an EMA, so sharded weights, optimizer moments and EMA all round-trip
    extra = [f"train.finetune={finetune}"] + (["train.ema_decay=0.5"] if finetune == "full" else [])

    def cfg_for(run):
        return build_config({}, SETTINGS + extra + [f"run.output_dir={run}", "train.batch_size=1"])

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for run in (straight, resumed):
        (tmp_path / f"{run.name}.yaml").write_text(yaml.safe_dump(cfg_for(run).to_dict()))
    _torchrun(tmp_path / "straight.yaml", random_world, steps=2)
    _torchrun(tmp_path / "resumed.yaml", random_world, steps=1)
    _torchrun(tmp_path / "resumed.yaml", random_world, steps=1, resume=True)
    a, b = _weights(straight, 2), _weights(resumed, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    if finetune == "full":
        ema_a, ema_b = (load_file(str(r / "checkpoints" / "step-00000002" / "ema.safetensors"))
                        for r in (straight, resumed))
        assert ema_a.keys() == a.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
        opt_a, opt_b = (torch.load(r / "checkpoints" / "step-00000002" / "optimizer.pt", weights_only=True)
                        for r in (straight, resumed))
        assert len(opt_a["state"]) == len(a)  # one Adam state per parameter, numbered as a 1-process run numbers them
        assert all(torch.equal(opt_a["state"][i]["exp_avg"], opt_b["state"][i]["exp_avg"]) for i in opt_a["state"])


def test_fsdp_checkpoint_resumes_in_one_process_with_the_same_global_batch(random_world, tmp_path):
    """Checkpoints hold whole tensors, so a 2-process FSDP run can continue on 1 process (per-rank noise: the same
    trajectory), and it ends where a 1-process run with the global batch ends."""
    full = ["train.finetune=full"]
    one = tmp_path / "one"
    train(build_config({}, SETTINGS + full + [f"run.output_dir={one}", "train.batch_size=2"]), log=lambda *_: None,
          max_steps_this_session=2)
    moved = tmp_path / "moved"
    cfg2 = build_config({}, SETTINGS + full + [f"run.output_dir={moved}", "train.batch_size=1"])
    (tmp_path / "moved.yaml").write_text(yaml.safe_dump(cfg2.to_dict()))
    _torchrun(tmp_path / "moved.yaml", random_world, steps=1)
    assert json.loads((moved / "checkpoints" / "step-00000001" / "state.json").read_text())["distributed"] == "fsdp"
    cfg1 = build_config({}, SETTINGS + full + [f"run.output_dir={moved}", "train.batch_size=2"])
    train(cfg1, resume=True, log=lambda *_: None, max_steps_this_session=1)
    a, b = _weights(one, 2), _weights(moved, 2)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6), k


def test_fsdp_with_lora_is_refused():
    from directalign.engine.config import ConfigError

    with pytest.raises(ConfigError, match="train.distributed=fsdp shards full fine-tuning"):
        build_config({}, ["train.distributed=fsdp"])


def test_fsdp_run_finishes_with_an_export_of_the_trained_weights(random_world, tmp_path):
    """At the end rank 0 gathers the shards into an ordinary module, evaluates it and exports it."""
    from diffusers import FluxTransformer2DModel

    run = tmp_path / "fsdp"
    cfg = build_config({}, SETTINGS + ["train.finetune=full", f"run.output_dir={run}", "train.batch_size=1",
                                       "train.steps=2", "eval.seeds=[0]", "eval.steps=2", "eval.best_of=1",
                                       "eval.prompts=tiny-world:heldout"])
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    _torchrun(tmp_path / "fsdp.yaml", random_world, steps=2)
    summary = json.loads((run / "summary.json").read_text())
    assert isinstance(summary["reward_after"], float)
    exported = FluxTransformer2DModel.from_pretrained(run / "export" / "transformer").state_dict()
    trained = _weights(run, 2)
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)


def test_accelerate_launch_runs_the_same_training(random_world, tmp_path):
    """``accelerate launch`` sets the same environment as torchrun: its 2-process run equals torchrun's."""
    runs = {}
    for launcher in ("torchrun", "accelerate"):
        run = tmp_path / launcher
        cfg = build_config({}, SETTINGS + [f"run.output_dir={run}", "train.batch_size=1"])
        (tmp_path / f"{launcher}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        _torchrun(tmp_path / f"{launcher}.yaml", random_world, steps=1, launcher=launcher)
        runs[launcher] = _weights(run, 1)
        assert json.loads((run / "checkpoints" / "step-00000001" / "state.json").read_text())["world_size"] == 2
    a, b = runs["torchrun"], runs["accelerate"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_bf16_computes_in_bf16_on_float32_shards(random_world, tmp_path):
    """``train.mixed_precision=bf16`` under FSDP2: parameters are gathered in bf16 for compute and gradients reduced
    in float32, so the checkpoint keeps float32 weights that differ from the float32 run (bf16 ran) by no more than
    one Adam step can move a weight (lr, with adam_eps > 0 and no weight decay)."""
    runs = {}
    for mp in ("no", "bf16"):
        run = tmp_path / mp
        cfg = build_config({}, SETTINGS + ["train.finetune=full", f"run.output_dir={run}", "train.batch_size=1",
                                           f"train.mixed_precision={mp}", "train.weight_decay=0"])
        (tmp_path / f"{mp}.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
        _torchrun(tmp_path / f"{mp}.yaml", random_world, steps=1)
        runs[mp] = _weights(run, 1)
    full, mixed = runs["no"], runs["bf16"]
    assert full.keys() == mixed.keys() and all(t.dtype == torch.float32 for t in mixed.values())
    diff = max((full[k] - mixed[k]).abs().max().item() for k in full)
    assert 0 < diff <= 1e-3 + 1e-6, diff
