"""The resource planner (``directalign plan``) against the real tiny modules: parameter counts, FLOPs and memory.

Parameter counts and FLOPs must equal the real modules' exactly (the planner builds the same classes on the meta
device and counts with the same ``FlopCounterMode``); the memory estimate is checked against the C allocator's
in-use bytes (glibc ``mallinfo2``, sampled after every aten operator) of a real tiny SRPO step on the CPU.
"""

from __future__ import annotations

import ctypes
import json

import pytest
import torch
from helpers import PROMPTS, build_parts, context, tiny_config
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from directalign.adapters.flux2 import Flux2Adapter, Flux2KleinAdapter
from directalign.adapters.qwen_image import QwenImageAdapter
from directalign.adapters.sd3 import SD3Adapter
from directalign.adapters.tiny import tiny_qwen_image_pipeline, tiny_sd3_pipeline
from directalign.adapters.tiny_flux2 import (
    DEV_TOKENS,
    KLEIN_TOKENS,
    tiny_flux2_klein_pipeline,
    tiny_flux2_pipeline,
)
from directalign.adapters.tiny_wan import tiny_wan_pipeline
from directalign.adapters.tiny_z_image import tiny_z_image_pipeline
from directalign.adapters.wan import WanAdapter
from directalign.adapters.z_image import ZImageAdapter
from directalign.cli import main
from directalign.config import load_config, packaged_config
from directalign.methods.registry import METHODS
from directalign.plan import measure, probes, work
from directalign.plan.estimate import GIB, plan, setup_transformer
from directalign.plan.sources import build_meta, component_config, model_dir
from directalign.rewards.registry import load_reward

CPU = torch.device("cpu")


def _count(module, skip_lora: bool = False) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not (skip_lora and "lora_" in n))


@pytest.fixture(scope="module")
def srpo_parts():
    cfg = tiny_config("srpo", "train.batch_size=4")
    adapter, reward, method, params = build_parts(cfg)
    return cfg, adapter, reward, method, params


def test_parameter_counts_equal_the_real_tiny_modules(srpo_parts):
    cfg, adapter, reward, _, params = srpo_parts
    p = plan(cfg)
    pipe = adapter.pipe
    assert p["params"]["transformer"] == _count(pipe.transformer, skip_lora=True)
    assert p["trainable"]["this_run"] == p["trainable"]["lora"] == sum(x.numel() for x in params) > 0
    assert p["params"]["vae"] == _count(pipe.vae)
    assert p["params"]["text_encoders"] == {"text_encoder": _count(pipe.text_encoder),
                                            "text_encoder_2": _count(pipe.text_encoder_2)}
    assert p["params"]["reward"] == _count(reward.model)
    full = plan(tiny_config("srpo", "train.batch_size=4", "train.finetune=full"))
    n = p["params"]["transformer"]
    assert full["trainable"]["this_run"] == full["trainable"]["full"] == n
    # float32 masters, gradients and two AdamW moments of every trainable weight
    assert full["memory_gib"]["transformer_weights"] * GIB == pytest.approx(4 * n)
    assert full["memory_gib"]["adamw_state"] * GIB == pytest.approx(8 * n)
    assert p["memory_gib"]["gradients"] * GIB == pytest.approx(4 * p["trainable"]["lora"])


def test_flops_on_meta_equal_the_real_tiny_model(srpo_parts):
    cfg, adapter, reward, _, _ = srpo_parts
    p = plan(cfg)
    meta = p["measured"]
    shapes = probes.Shapes(meta["rows"], cfg.model.height, cfg.model.width, tuple(p["latent"]), p["text_tokens"])
    flux = probes.TRANSFORMER_PROBES["FluxTransformer2DModel"]
    with sdpa_kernel(SDPBackend.MATH):  # CPU's fused attention op has no FLOP formula; the math path counts it
        real = measure.graph_cost(adapter.transformer, flux, shapes, torch.float32, CPU, adapter.vae, False,
                                  reward.model)
    # the same graph on meta modules built from the same configs, through the same attention path: equal
    transformer = setup_transformer(dict(adapter.transformer.config), cfg.train, "flux", torch.float32, "lora")
    vae = build_meta(dict(adapter.vae.config), torch.float32).requires_grad_(False)
    clip = build_meta(reward.model.config.to_dict(), torch.float32).requires_grad_(False)
    on_meta = measure.graph_cost(transformer, flux, shapes, torch.float32, torch.device("meta"), vae, False, clip,
                                 fused=False)
    keys = ("transformer_forward", "transformer_train", "vae_forward", "vae_train", "reward_forward", "reward_train")
    for key in keys:
        assert getattr(real, key) == getattr(on_meta, key) > 0, key
    # the plan's own numbers: forwards equal; the fused attention kernel's backward recomputes the attention scores
    for key in keys:
        assert meta[key] == getattr(real, key) if "forward" in key or key == "vae_train" else meta[key] > getattr(
            real, key), key
    # the probe is the adapter's own call: the FLOPs of adapter.velocity with real prompt embeddings
    embeds = adapter.encode_prompts(PROMPTS[:1])
    x = adapter.noise(1, cfg.model.height, cfg.model.width, torch.Generator().manual_seed(0))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        adapter.velocity(x, torch.tensor([0.5]), embeds, 5.0, cfg.model.height, cfg.model.width)
    assert fc.get_total_flops() == meta["transformer_forward"] / meta["rows"]
    # the update's total follows the method's call counts
    w = p["work"]
    assert p["flops"]["rollout"] == w["nfe_no_grad"] * meta["transformer_forward"] / meta["rows"]


@pytest.mark.parametrize("family", ["sd3", "qwen-image"])
def test_sd3_and_qwen_probes_equal_the_adapters_call(family):
    pipe = tiny_sd3_pipeline() if family == "sd3" else tiny_qwen_image_pipeline()
    adapter = (SD3Adapter if family == "sd3" else QwenImageAdapter)(pipe)
    side = 32 if family == "sd3" else 16
    embeds = adapter.encode_prompts(PROMPTS[:1])
    x = adapter.noise(1, side, side, torch.Generator().manual_seed(0))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        adapter.velocity(x, torch.tensor([0.5]), embeds, 1.0, side, side)
    config = {**pipe.transformer.config, "_class_name": type(pipe.transformer).__name__}
    meta = build_meta(config, torch.float32)
    shapes = probes.Shapes(1, side, side, adapter.latent_hw(side, side), embeds.tokens.shape[1])
    with torch.no_grad(), measure.fused_attention(), FlopCounterMode(display=False) as fc_meta:
        probes.TRANSFORMER_PROBES[config["_class_name"]](meta, shapes, torch.float32, torch.device("meta"))
    assert fc_meta.get_total_flops() == fc.get_total_flops() > 0
    assert _count(meta) == _count(pipe.transformer)


_NEW_FAMILIES = {  # family -> the adapter on its tiny pipeline (the real diffusers classes, tiny configs)
    "flux2": lambda: Flux2Adapter(tiny_flux2_pipeline(0), DEV_TOKENS),
    "flux2-klein": lambda: Flux2KleinAdapter(tiny_flux2_klein_pipeline(0), KLEIN_TOKENS),
    "z-image": lambda: ZImageAdapter(tiny_z_image_pipeline(0), max_sequence_length=64),
    "wan": lambda: WanAdapter(tiny_wan_pipeline(0), frames=5),
}


@pytest.mark.parametrize("family", sorted(_NEW_FAMILIES))
def test_flux2_z_image_and_wan_probes_equal_the_adapters_call(family):
    """The probe's FLOPs on meta modules equal those of the adapter's own velocity call on the real tiny model
    (one pass: guidance 1; Z-Image's caption is the prompt's unpadded tokens; Wan runs all latent frames)."""
    adapter = _NEW_FAMILIES[family]()
    side = 16
    embeds = adapter.encode_prompts(PROMPTS[:1])
    x = adapter.noise(1, side, side, torch.Generator().manual_seed(0))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        adapter.velocity(x, torch.tensor([0.5]), embeds, 1.0, side, side)
    tokens = int(embeds.mask.sum()) if family == "z-image" else embeds.tokens.shape[1]
    frames = adapter.latent_frames() if family == "wan" else 1
    config = {**adapter.transformer.config, "_class_name": type(adapter.transformer).__name__}
    meta = build_meta(config, torch.float32)
    shapes = probes.Shapes(1, side, side, adapter.latent_hw(side, side), tokens, frames)
    with torch.no_grad(), measure.fused_attention(), FlopCounterMode(display=False) as fc_meta:
        out = probes.TRANSFORMER_PROBES[config["_class_name"]](meta, shapes, torch.float32, torch.device("meta"))
    assert fc_meta.get_total_flops() == fc.get_total_flops() > 0
    assert _count(meta) == _count(adapter.transformer)
    assert out.dim() == (5 if family == "wan" else 3 if family != "z-image" else 4) and out.shape[0] == 1
    assert frames == (3 if family == "wan" else 1)  # 5 frames, temporal factor 4


# Published transformer sizes (rounded as published): FLUX.2-dev "a 32 billion parameter rectified flow transformer"
# (black-forest-labs/FLUX.2-dev model card, quoted in leejet/stable-diffusion.cpp issue 1007), FLUX.2-klein base "4B"
# (the model's name; diffusers scripts/convert_flux2_to_diffusers.py "klein-4b"), Z-Image "6B-parameter" (arXiv
# 2511.22699), Wan2.1 T2V "14B" and Wan2.2 T2V "A14B" (14B per expert; diffusers scripts/convert_wan_to_diffusers.py
# "Wan-T2V-14B", "Wan2.2-T2V-A14B"). The tolerance is the published figure's own rounding where that exceeds 2 %.
PUBLISHED = {
    "black-forest-labs/FLUX.2-dev": (32e9, 0.02),
    "black-forest-labs/FLUX.2-klein-base-4B": (4e9, 0.05),
    "Tongyi-MAI/Z-Image": (6e9, 0.03),
    "Wan-AI/Wan2.1-T2V-14B-Diffusers": (14e9, 0.025),
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers": (14e9, 0.025),
}


@pytest.mark.parametrize("hub_id", sorted(PUBLISHED))
def test_shipped_transformer_configs_have_the_published_size(hub_id):
    folder = model_dir(hub_id)
    config = component_config(folder, "transformer")
    n = _count(build_meta(config, torch.bfloat16))
    expected, rel = PUBLISHED[hub_id]
    assert n == pytest.approx(expected, rel=rel)
    assert config["_class_name"] in probes.TRANSFORMER_PROBES
    second = component_config(folder, "transformer_2")  # Wan 2.2: a second expert of the same architecture
    assert (second == config) if "Wan2.2" in hub_id else second is None


def _mallinfo():
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2")

    class Info(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    fn.restype = Info
    return lambda: fn().uordblks + fn().hblkhd


class AllocatorPeak(TorchDispatchMode):
    """The C allocator's bytes in use, sampled after every aten operator: independent of the planner's accounting."""

    def __init__(self, inuse):
        super().__init__()
        self.inuse = inuse
        self.start = inuse()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.inuse() - self.start)
        return out


def test_memory_estimate_matches_the_allocator_on_a_real_tiny_srpo_step(srpo_parts):
    """Activations + gradients + AdamW state of the plan against the allocator's peak increment over one real
    step (rollout, both branches with backward, optimizer step). Measured: 40.2 MiB estimated, 41.1 MiB measured
    (2 %); the tolerance is 10 %."""
    inuse = _mallinfo()
    cfg, _adapter, _, method, params = srpo_parts
    p = plan(cfg)
    prompts = PROMPTS * 2
    method.train_step(context(0, prompts), lambda loss: loss.backward())  # warm-up: caches, lazy buffers
    for q in params:
        q.grad = None
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    with AllocatorPeak(inuse) as mode:
        method.train_step(context(1, prompts), lambda loss: loss.backward())
        optimizer.step()
    measured = mode.peak
    mem = p["memory_gib"]
    estimated = (mem["activations"] + mem["gradients"] + mem["adamw_state"]) * GIB
    print(f"tiny SRPO step: estimated {estimated / 2**20:.2f} MiB, measured {measured / 2**20:.2f} MiB")
    assert measured == pytest.approx(estimated, rel=0.10)


def test_memory_follows_sharding_and_checkpointing():
    base = plan(tiny_config("srpo", "train.finetune=full"))
    sharded = plan(tiny_config("srpo", "train.finetune=full"), gpus=4)
    assert sharded["strategy"] == "fsdp2" and base["strategy"] == "single"
    for key in ("transformer_weights", "gradients", "adamw_state"):
        assert sharded["memory_gib"][key] == pytest.approx(base["memory_gib"][key] / 4)
    assert sharded["memory_gib"]["fsdp_gathered"] > 0 == base["memory_gib"]["fsdp_gathered"]
    ckpt = plan(tiny_config("srpo", "train.finetune=full", "train.gradient_checkpointing=true"))
    assert ckpt["measured"]["retained_after_forward"] < base["measured"]["retained_after_forward"]
    assert ckpt["flops"]["grad_branches"] > base["flops"]["grad_branches"]  # the recomputed forward
    replicated = plan(tiny_config("srpo"), gpus=4)  # LoRA replicates: nothing sharded, 4x the global batch
    assert replicated["strategy"] == "replicate" and replicated["global_batch"] == 4 * replicated["batch_size"]


@pytest.mark.parametrize("name", sorted(work.WORK))
def test_work_functions_equal_the_methods_own_nfe(name, srpo_parts):
    _, adapter, _, _, _ = srpo_parts
    cfg = tiny_config(name, "train.batch_size=3")
    reward = load_reward(cfg.reward, CPU, METHODS[name].held_out_form(cfg)[0])
    built = METHODS[name].build(cfg, adapter, reward).nfe(cfg.train.batch_size)
    w = work.work_of(cfg)
    assert (w.nfe_no_grad, w.nfe_grad) == pytest.approx((built["nfe_no_grad"], built["nfe_grad"]))
    assert w.nfe_grad > 0


def _shipped():
    return sorted(f.stem for f in packaged_config("tiny-srpo").parent.glob("*.yaml"))


@pytest.mark.parametrize("name", _shipped())
def test_every_shipped_config_names_a_model_the_planner_knows(name):
    """Issue 17: ``directalign plan`` answers for every shipped config, not with the one-line unknown-model error."""
    cfg = load_config(packaged_config(name))
    assert (model_dir(cfg.model.path) / "transformer" / "config.json").is_file()


@pytest.mark.parametrize("name", [n for n in _shipped() if n.startswith("tiny-")])
def test_every_tiny_config_answers(name):
    _answers(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in _shipped() if not n.startswith("tiny-")])
def test_every_real_model_config_answers(name):
    _answers(name)


def _answers(name):
    cfg = load_config(packaged_config(name))
    p = plan(cfg, config_name=name)
    assert p["flops"]["total"] > p["flops"]["rollout"] >= 0
    assert p["memory_gib"]["total"] > p["memory_gib"]["activations"] > 0
    assert p["params"]["transformer"] > 0 and isinstance(p["gpu"]["fits"], bool)
    assert all(n > 0 for n in p["params"]["text_encoders"].values()) and p["params"]["text_encoders"]
    # a second transformer (Wan 2.2's other expert) stays resident in model.dtype; none elsewhere
    second = 2 * p["params"]["transformer"] if "wan22" in name else 0
    assert p["memory_gib"]["other_transformer_weights"] * GIB == pytest.approx(second)
    json.dumps(p)


@pytest.mark.slow
def test_flux_dev_srpo_lora_fits_one_80gb_gpu_and_full_does_not():
    """The shipped config's claim (LoRA with gradient checkpointing fits one 80 GB GPU at 720 px)."""
    lora = plan(load_config(packaged_config("flux-dev-srpo-hpsv2"), ["train.finetune=lora"]))
    full = plan(load_config(packaged_config("flux-dev-srpo-hpsv2")))
    assert lora["params"]["transformer"] == pytest.approx(11.9e9, rel=0.01)  # FLUX.1-dev: 12B
    assert lora["gpu"]["fits"] and not full["gpu"]["fits"]
    assert full["memory_gib"]["adamw_state"] * GIB == pytest.approx(8 * full["params"]["transformer"])


def test_bad_gpu_and_bad_config_are_one_line_errors(capsys):
    assert main(["plan", "--gpu", "B9000"]) == 2
    err = capsys.readouterr().err.strip()
    assert "B9000" in err and "H100-SXM" in err and len(err.splitlines()) == 1
    assert main(["plan", "--config", "no-such-config.yaml"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert main(["plan", "--config", "tiny-srpo", "--set", "model.path=someone/unknown-model"]) == 2
    err = capsys.readouterr().err.strip()
    assert "someone/unknown-model" in err and len(err.splitlines()) == 1
    assert main(["plan", "--config", "tiny-srpo", "--set", "model.height=33"]) == 2
    assert "multiples of" in capsys.readouterr().err


def test_cli_table_and_json(capsys):
    assert main(["plan", "--config", "tiny-srpo", "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["config"] == "tiny-srpo" and p["gpu"]["name"] == "H100-SXM"
    assert p["gpu"]["time_per_update_s_lower_bound"] == pytest.approx(p["flops"]["total"] / 989e12)
    assert main(["plan", "--config", "tiny-srpo", "--gpu", "rtx 4090", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "RTX-4090" in out and "memory per GPU" in out and "FLOPs per update" in out
