"""Float32 master weights under a bfloat16 model (``engine.precision.float32_master_weights``).

AdamW at lr 5e-6 cannot move bf16 weights: a 5e-6 step is below half a bf16 ulp of any ``|w| >= 2^-9``, so the
update rounds away. With the trainable parameters cast to float32 (as the official SRPO run's fp32 master weights
under bf16 autocast) nearly every element moves. Built on the tiny world's FLUX transformer shape
(``directalign.world.architecture.TRANSFORMER_CONFIG``), randomly initialised and cast to bf16.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig
from safetensors.torch import load_file

from directalign.engine import precision
from directalign.world import architecture as arch

# torch warns that rms_norm's fused kernel needs one dtype for input and weight (bf16 activations, float32 weight)
pytestmark = pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")

LR = 5e-6
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _bf16_transformer() -> FluxTransformer2DModel:
    torch.manual_seed(0)
    return FluxTransformer2DModel(**arch.TRANSFORMER_CONFIG).to(torch.bfloat16)


def _inputs(batch: int = 2, tokens: int = 16, text: int = 8) -> dict:
    g = torch.Generator().manual_seed(1)
    c = arch.TRANSFORMER_CONFIG
    ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"), -1)
    return {
        "hidden_states": torch.randn(batch, tokens, c["in_channels"], generator=g),
        "encoder_hidden_states": torch.randn(batch, text, c["joint_attention_dim"], generator=g),
        "pooled_projections": torch.randn(batch, c["pooled_projection_dim"], generator=g),
        "timestep": torch.full((batch,), 0.7),
        "img_ids": ids.reshape(tokens, 3),
        "txt_ids": torch.zeros(text, 3),
        "guidance": torch.full((batch,), 3.5),
        "return_dict": False,
    }


def _loss(transformer) -> torch.Tensor:
    """A simple loss through the whole transformer, its forward under bf16 autocast (``train.mixed_precision``)."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = transformer(**_inputs())[0]
    return out.float().square().mean()


def _train(transformer, steps: int = 3) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` AdamW steps at lr 5e-6 (the official SRPO settings); each trainable tensor before and after."""
    named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in named}
    opt = torch.optim.AdamW([p for _, p in named], lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        _loss(transformer).backward()
        opt.step()
    return {n: (before[n], p.detach()) for n, p in named}


def _changed(pairs) -> float:
    """The fraction of elements that moved."""
    pairs = list(pairs)
    moved = sum(int((a != b).sum()) for a, b in pairs)
    return moved / sum(a.numel() for a, _ in pairs)


def test_trainable_parameters_become_float32_and_frozen_ones_stay_untouched():
    transformer = _bf16_transformer()
    transformer.requires_grad_(False)
    transformer.transformer_blocks.requires_grad_(True)
    transformer.proj_out.requires_grad_(True)
    params = dict(transformer.named_parameters())
    frozen = {n: p.detach().clone() for n, p in params.items() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in params.items() if p.requires_grad}
    assert frozen and trainable

    assert precision.float32_master_weights(transformer) is torch.bfloat16
    after = dict(transformer.named_parameters())
    assert all(after[n] is params[n] for n in params)  # the same Parameter objects, cast in place
    for n, old in trainable.items():
        assert after[n].dtype == torch.float32 and after[n].requires_grad, n
        assert torch.equal(after[n], old.float()), n  # bf16 -> float32 is exact
    for n, old in frozen.items():
        assert after[n].dtype == torch.bfloat16 and not after[n].requires_grad, n
        assert torch.equal(after[n], old), n
    assert precision.float32_master_weights(transformer) is None  # nothing left to cast

    # bf16 frozen + float32 trainable computes under autocast, and the gradients are float32
    loss = _loss(transformer)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in transformer.parameters()
               if p.requires_grad)
    assert all(p.grad is None for p in transformer.parameters() if not p.requires_grad)


def test_nothing_to_cast_and_mixed_low_dtypes():
    frozen = torch.nn.Linear(3, 3).to(torch.bfloat16).requires_grad_(False)
    assert precision.float32_master_weights(frozen) is None
    assert frozen.weight.dtype == torch.bfloat16
    assert precision.float32_master_weights(torch.nn.Linear(3, 3)) is None
    double = torch.nn.Linear(3, 3).double()
    assert precision.float32_master_weights(double) is None and double.weight.dtype == torch.float64
    mixed = torch.nn.Sequential(torch.nn.Linear(3, 3).half(), torch.nn.Linear(3, 3).to(torch.bfloat16))
    with pytest.raises(ValueError, match="several low-precision dtypes"):
        precision.float32_master_weights(mixed)


def test_full_finetune_moves_float32_master_weights_but_not_bf16_ones():
    master = _bf16_transformer().requires_grad_(True)
    assert precision.float32_master_weights(master) is torch.bfloat16
    moved = _changed(_train(master).values())
    assert moved > 0.99, moved

    plain = _bf16_transformer().requires_grad_(True)  # the bug: AdamW straight on bf16 parameters
    pairs = _train(plain)
    assert all(a.dtype == torch.bfloat16 for a, _ in pairs.values())
    stuck = _changed(pairs.values())
    assert stuck < 0.1, stuck


def _lora(transformer):
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights=True))
    return transformer


def test_lora_adapter_weights_are_float32_over_a_bf16_base_and_move():
    master = _lora(_bf16_transformer())
    base = {n: p.detach().clone() for n, p in master.named_parameters() if not p.requires_grad}
    # diffusers' add_adapter creates the adapter in the base layer's dtype
    assert {p.dtype for p in master.parameters() if p.requires_grad} == {torch.bfloat16}
    assert precision.float32_master_weights(master) is torch.bfloat16
    lora = {n: p for n, p in master.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n and p.dtype == torch.float32 for n, p in lora.items())
    pairs = _train(master)
    assert _changed(pairs.values()) > 0.99, _changed(pairs.values())
    assert all(p.dtype == torch.bfloat16 and torch.equal(p, base[n])
               for n, p in master.named_parameters() if not p.requires_grad)

    # the bug: bf16 adapter weights. B starts at zero, where bf16's spacing is fine, so B moves; A (|a| ~ 0.1) does not
    plain = _train(_lora(_bf16_transformer()))
    a_plain = _changed(v for n, v in plain.items() if "lora_A" in n)
    a_master = _changed(v for n, v in pairs.items() if "lora_A" in n)
    assert a_master > 0.99 and a_plain < 0.1, (a_master, a_plain)


# ---------------------------------------------------------------------------------------------- through train()
@pytest.mark.parametrize("method", ["srpo", "direct-align", "refl", "draft-k", "draft-lv", "alignprop", "grpo"])
def test_full_finetune_of_a_bf16_model_moves_nearly_every_weight_in_three_steps(random_world, tmp_path, method):
    """The bug the FLUX configs had: model.dtype=bfloat16 + full fine-tuning at lr 5e-6 moved ~2 % of the weights;
    with float32 masters every method moves more than 99 % of them in 3 steps."""
    from diffusers import FluxTransformer2DModel
    from helpers import quiet, tiny_config

    from directalign.training import train

    run = tmp_path / "run"
    cfg = tiny_config(method, "model.dtype=bfloat16", "train.finetune=full", "train.learning_rate=5e-6",
                      "train.grad_clip=0", "train.steps=3", "run.checkpoint_every=0", run_dir=run)
    base = FluxTransformer2DModel.from_pretrained(random_world / "generator" / "transformer",
                                                  torch_dtype=torch.bfloat16).state_dict()
    train(cfg, log=quiet, max_steps_this_session=3)
    trained = load_file(str(run / "checkpoints" / "step-00000003" / "trainable.safetensors"))
    assert all(t.dtype == torch.float32 for t in trained.values()), "checkpoint does not hold float32 masters"
    changed = sum(int((trained[k] != base[k].float()).sum()) for k in base)
    total = sum(t.numel() for t in base.values())
    assert changed / total > 0.99, f"{method}: only {changed / total:.1%} of the weights moved"


def test_lora_of_a_bf16_model_keeps_float32_adapter_weights_that_move(random_world, tmp_path):
    from helpers import quiet, tiny_config

    from directalign.training import train

    run = tmp_path / "run"
    cfg = tiny_config("srpo", "model.dtype=bfloat16", "train.learning_rate=5e-6", "train.grad_clip=0",
                      "train.steps=3", run_dir=run)
    result = train(cfg, log=quiet, max_steps_this_session=3)
    lora = {n: p for n, p in result.adapter.transformer.named_parameters() if "lora_" in n}
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    trained = load_file(str(run / "checkpoints" / "step-00000003" / "trainable.safetensors"))
    a = [t for k, t in trained.items() if "lora_A" in k]
    assert a and all(t.dtype == torch.float32 for t in trained.values())
    # lora_B starts at zero and lora_A gets no gradient until B moves; after 3 steps B must have moved everywhere
    b = [t for k, t in trained.items() if "lora_B" in k]
    assert sum(int((t != 0).sum()) for t in b) / sum(t.numel() for t in b) > 0.99
