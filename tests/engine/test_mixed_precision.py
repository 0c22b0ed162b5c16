"""``train.mixed_precision=bf16``: the transformer computes in bf16 while its weights, gradients and Adam state stay
float32 (autocast in one process; FSDP2's MixedPrecisionPolicy is in tests/test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from directalign.adapters.flux import FluxAdapter
from directalign.engine import precision
from directalign.config import build_config
from directalign.training import train

FAST = ["train.batch_size=2", "srpo.rollout_steps=2", "eval.before=false", "run.progress=false",
        "srpo.grid_points=40", "srpo.window_margin=2", "train.learning_rate=1e-3", "train.grad_clip=0",
        "train.adam_eps=1e-3", "train.weight_decay=0", "eval.seeds=[0]", "eval.steps=2", "eval.best_of=1",
        "run.checkpoint_every=1"]


def _adapter(world):
    from diffusers import FluxPipeline

    return FluxAdapter(FluxPipeline.from_pretrained(world / "generator", local_files_only=True))


def _velocity(adapter):
    gen = torch.Generator().manual_seed(0)
    x = adapter.noise(2, 32, 32, gen)
    embeds = adapter.encode_prompts(["a red star on a blue background", "a green circle on a white background"])
    return adapter.velocity(x, torch.tensor([0.7]), embeds, 3.5, 32, 32)


# torch warns that rms_norm's fused kernel needs one dtype for input and weight (bf16 activations, float32 weight)
@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")
def test_autocast_forward_computes_in_bf16_and_keeps_float32_weights_and_gradients(random_world):
    adapter = _adapter(random_world)
    full = _velocity(adapter)
    assert full.dtype == torch.float32

    precision.autocast_forward(adapter.transformer, torch.bfloat16)
    mixed = _velocity(adapter)
    assert mixed.dtype == torch.bfloat16
    # the same function, rounded: close to the float32 result but not equal to it
    rel = ((mixed.float() - full).norm() / full.norm()).item()
    assert 0 < rel < 0.05, rel
    mixed.float().square().mean().backward()
    params = [p for p in adapter.transformer.parameters()]
    assert all(p.dtype == torch.float32 for p in params)
    grads = [p.grad for p in params if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)

    precision.restore_forward(adapter.transformer)
    assert torch.equal(_velocity(adapter), full)


def test_compute_dtype_maps_the_config_values():
    assert precision.compute_dtype("no") is None
    assert precision.compute_dtype("bf16") is torch.bfloat16
    policy = precision.fsdp_policy(torch.bfloat16)
    assert policy.param_dtype is torch.bfloat16 and policy.reduce_dtype is torch.float32
    assert precision.fsdp_policy(None).param_dtype is None


@pytest.mark.parametrize("finetune,checkpointing", [("lora", False), ("full", True)])
def test_bf16_training_moves_float32_weights_close_to_the_float32_run(random_world, tmp_path, finetune,
                                                                     checkpointing):
    """Two steps with and without bf16 compute: the checkpoints hold float32 tensors, both runs move the weights,
    and they differ (bf16 really ran) by at most what two Adam steps can move a weight (lr per step with eps > 0)."""
    runs = {}
    for mp in ("no", "bf16"):
        run = tmp_path / mp
        cfg = build_config({}, FAST + [f"run.output_dir={run}", f"train.finetune={finetune}", "train.steps=2",
                                       f"train.mixed_precision={mp}", "train.lora_rank=4", "train.lora_alpha=8",
                                       f"train.gradient_checkpointing={str(checkpointing).lower()}"])
        result = train(cfg, max_steps_this_session=2, log=lambda *a, **k: None)
        assert "forward" not in vars(result.adapter.transformer)  # evaluated unwrapped, as the base was
        runs[mp] = (load_file(str(run / "checkpoints" / "step-00000001" / "trainable.safetensors")),
                    load_file(str(run / "checkpoints" / "step-00000002" / "trainable.safetensors")))
    (f1, f2), (m1, m2) = runs["no"], runs["bf16"]
    assert f2.keys() == m2.keys() and all(t.dtype == torch.float32 for t in m2.values())
    assert any(not torch.equal(m1[k], m2[k]) for k in m2)  # bf16 training moves the weights
    diff = max((f2[k] - m2[k]).abs().max().item() for k in f2)
    assert 0 < diff <= 2 * 1e-3 + 1e-6, diff
