"""benchmarks/gpu_step.py at tiny size on the CPU, in-process: the JSON's structure and its internal consistency
(MFU, the per-block split and full-depth extrapolation, the planner's linear form in depth, the float32 master
weights and AdamW state of LoRA against full fine-tuning). Timings themselves are not checked."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_step.py"
DOUBLE, SINGLE, ROLLOUT = 2, 3, 2


def _load():
    spec = importlib.util.spec_from_file_location("gpu_step", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    mod = _load()
    out = tmp_path_factory.mktemp("gpu_step") / "cpu.json"
    report = mod.main(["--tiny", "--device", "cpu", "--double-blocks", str(DOUBLE), "--single-blocks", str(SINGLE),
                       "--rollout-steps", str(ROLLOUT), "--updates", "1", "--warmup", "1", "--gpu", "A100-80GB",
                       "--out", str(out)])
    return mod, report, json.loads(out.read_text())


def test_json_holds_both_modes_and_the_machine(run):
    _, report, on_disk = run
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk["results"]) == {"lora", "full"}
    assert on_disk["gpu"]["name"] == "A100-80GB" and on_disk["gpu"]["bf16_tflops"] == 312.0
    m = on_disk["machine"]
    assert m["device"] == "cpu" and m["usable_cores"] >= 1 and m["torch_threads"] >= 1
    assert (on_disk["double_blocks"], on_disk["single_blocks"], on_disk["size"]) == (DOUBLE, SINGLE, 64)
    assert on_disk["transformer_config"]["num_layers"] == DOUBLE
    assert on_disk["transformer_config"]["num_single_layers"] == SINGLE
    # the SRPO update of the shipped config: the rollout's calls without gradient, both branches with it
    assert (on_disk["nfe_no_grad"], on_disk["nfe_grad"]) == (ROLLOUT, 2)
    assert on_disk["image_tokens"] == (64 // 8 // 2) ** 2
    for r in on_disk["results"].values():
        assert r["seconds_per_update"] > 0 and len(r["seconds_all"]) == 1
        assert r["peak_memory_bytes"] >= 0 and "RSS" in r["peak_memory_kind"]


def test_mfu_is_planned_flops_over_seconds_times_peak(run):
    _, report, _ = run
    peak = report["gpu"]["bf16_tflops"] * 1e12
    for r in report["results"].values():
        p = r["planner"]
        assert p["update_flops"] == pytest.approx(p["work"]["nfe_no_grad"] * p["forward_flops"]
                                                  + p["work"]["nfe_grad"] * p["train_flops"])
        assert p["train_flops"] > 2 * p["forward_flops"] > 0  # backward + checkpoint recomputation
        assert r["mfu"] == pytest.approx(p["update_flops"] / (r["seconds_per_update"] * peak))


def test_full_depth_is_time_per_block_times_blocks(run):
    _, report, _ = run
    peak = report["gpu"]["bf16_tflops"] * 1e12
    for r in report["results"].values():
        p, b, f = r["planner"], r["per_block"], r["full_depth"]
        # the planner's linear form in depth reproduces its direct count at the measured depth
        assert p["rest_flops"] + DOUBLE * p["double_block_flops"] + SINGLE * p["single_block_flops"] == \
            pytest.approx(p["update_flops"], rel=1e-9)
        assert p["double_block_flops"] > p["single_block_flops"] > 0
        # the per-block times add back up to the measured update and scale to the full depth
        assert b["rest_s"] + DOUBLE * b["double_s"] + SINGLE * b["single_s"] == \
            pytest.approx(r["seconds_per_update"])
        assert (f["double_blocks"], f["single_blocks"]) == (19, 38)
        assert f["extrapolated_s"] == pytest.approx(b["rest_s"] + 19 * b["double_s"] + 38 * b["single_s"])
        assert f["planner_flops"] == pytest.approx(p["rest_flops"] + 19 * p["double_block_flops"]
                                                   + 38 * p["single_block_flops"])
        assert f["planner_lower_bound_s"] == pytest.approx(f["planner_flops"] / peak)
        assert f["extrapolated_over_lower_bound"] == pytest.approx(f["extrapolated_s"] / f["planner_lower_bound_s"])


def test_lora_trains_fewer_weights_with_smaller_optimizer_state(run):
    _, report, _ = run
    lora, full = report["results"]["lora"], report["results"]["full"]
    assert 0 < lora["trainable_params"] < full["trainable_params"] == full["total_params"]
    assert lora["optimizer_state_bytes"] < full["optimizer_state_bytes"]
    for r in (lora, full):  # AdamW's two float32 moments per trainable weight (+ a 4-byte step per tensor)
        assert 8 * r["trainable_params"] <= r["optimizer_state_bytes"] < 9 * r["trainable_params"]
    # float32 master weights of what trains, the frozen base in bf16 (engine/precision.float32_master_weights)
    frozen = lora["total_params"] - lora["trainable_params"]
    assert lora["weight_bytes"] == 2 * frozen + 4 * lora["trainable_params"]
    assert full["weight_bytes"] == 4 * full["total_params"]
    assert frozen == full["total_params"]  # LoRA adds adapters to the same base


def test_size_must_fit_the_vae_and_patches():
    mod = _load()
    with pytest.raises(SystemExit):
        mod.parse_args(["--tiny", "--size", "72"])


@pytest.mark.slow  # a meta-device count through all 57 blocks takes ~10 s on two shared cores
def test_full_depth_flops_equal_the_planners_direct_count(run):
    import torch

    mod, report, _ = run
    args = mod.parse_args(["--tiny", "--rollout-steps", str(ROLLOUT)])
    cfg = mod.srpo_config("lora", args)
    config = mod.transformer_config(True, 19, 38)
    t = mod.setup_transformer(config, cfg.train, "flux", torch.bfloat16, "lora")
    shapes = mod.probes.Shapes(1, 64, 64, (8, 8), report["text_tokens"])
    g = mod.graph_cost(t, mod.probes.TRANSFORMER_PROBES["FluxTransformer2DModel"], shapes, torch.bfloat16,
                       torch.device("meta"), decode_in_graph=False)
    direct = report["nfe_no_grad"] * g.transformer_forward + report["nfe_grad"] * g.transformer_train
    assert report["results"]["lora"]["full_depth"]["planner_flops"] == pytest.approx(direct, rel=1e-9)
