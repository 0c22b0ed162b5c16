"""Every registered method, three real training steps on the random-weight tiny world: pinned loss / reward /
gradient-norm values, the method's own metrics in every record, LoRA weights that all move and frozen weights that
stay bit-identical; and the registry's ``build`` gives a :class:`~directalign.methods.base.Method`.

The goldens catch any change of a method's trajectory (noise streams, window draws, loss shares, reward forms): a
deliberate change re-measures them (see GOLDEN) and says why in the commit.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import quiet, tiny_config
from safetensors.torch import load_file

from directalign import training
from directalign.engine.finetune import trainable_state
from directalign.logging_utils import read_metrics
from directalign.methods.base import Method
from directalign.methods.registry import METHODS
from directalign.training import train

STEPS = 3

# (loss, reward, grad_norm) of steps 1..3 as metrics.jsonl holds them. Measured once (torch 2.13.0+cpu, diffusers
# 0.42.1, peft 0.21.2, 1 torch thread) by a script that ran ``train(tiny_config(method, "train.steps=3", run_dir=...))``
# on the random world this suite's ``random_world`` fixture builds and printed ``read_metrics``; a 2-thread run agreed
# to ~2e-6 relative. Re-measure the same way after a deliberate change of a method's trajectory.
GOLDEN = {
    "srpo": [(0.6934224367141724, 0.006577551364898682, 0.004598190542310476),
             (0.6886672377586365, 0.011332759633660316, 0.003285766812041402),
             (0.6755581498146057, 0.024441836401820183, 0.0010605868883430958)],
    "direct-align": [(4.94623327255249, 0.05376661196351051, 0.012849639169871807),
                     (4.971771240234375, 0.028228987008333206, 0.009118751622736454),
                     (4.910986423492432, 0.08901367336511612, 0.0032141637057065964)],
    "refl": [(4.949315071105957, 0.0506850965321064, 0.031063416972756386),
             (4.9724440574646, 0.02755586802959442, 0.01740400865674019),
             (4.912637710571289, 0.08736234903335571, 0.01776757836341858)],
    "draft-k": [(-0.053417645394802094, 0.053417645394802094, 0.031255338340997696),
                (-0.027549603953957558, 0.027549603953957558, 0.025773372501134872),
                (-0.0873655453324318, 0.0873655453324318, 0.02575385384261608)],
    "draft-lv": [(-0.056467205286026, 0.056467205286026, 0.028271250426769257),
                 (-0.02551120985299349, 0.02551120985299349, 0.025464685633778572),
                 (-0.07995151728391647, 0.07995151728391647, 0.02920076996088028)],
    "alignprop": [(-0.053417645394802094, 0.053417645394802094, 0.037665415555238724),
                  (-0.02754783071577549, 0.02754783071577549, 0.02576269395649433),
                  (-0.08733612298965454, 0.08733612298965454, 0.025734741240739822)],
    # GRPO's loss is on-policy sum(-A * ratio) with ratio = 1: zero up to float rounding (pinned with abs 1e-5)
    "grpo": [(0.0, 0.025025371462106705, 0.036515966057777405),
             (0.0, 0.05986263230443001, 0.036341696977615356),
             (8.642673492431641e-07, 0.02704603597521782, 0.03437906876206398)],
    # GRPO-Fast: 2 optimizer steps per rollout (steps 1-2 share one rollout's reward; step 2 is off-policy)
    "grpo-fast": [(-0.9880673885345459, 0.02816268987953663, 0.0098483981564641),
                  (0.9880402684211731, 0.02816268987953663, 0.008637960068881512),
                  (0.9726135730743408, 0.01586095057427883, 0.013109280727803707)],
    "nft": [(8.728309631347656, 0.040368154644966125, 0.07753223925828934),
            (9.62423038482666, 0.06221037358045578, 0.12297187000513077),
            (7.190839767456055, 0.02134569361805916, 0.12792076170444489)],
    "dpo": [(0.6931471824645996, 0.06070273742079735, 4.183895111083984),
            (0.6931098699569702, 0.022823641076683998, 3.9558322429656982),
            (0.6823675632476807, 0.08369453251361847, 4.475925922393799)],
    # AWM's loss is mean(A * w(mse)) with group-centred advantages: near zero, pinned with abs 1e-6
    "awm": [(-0.004329908173531294, 0.05926422402262688, 0.003162406850606203),
            (-0.004087370820343494, 0.020694969221949577, 0.004613034892827272),
            (0.0017434440087527037, 0.08193638175725937, 0.0056364452466368675)],
}
LOSS_ABS = {"grpo": 1e-5, "awm": 1e-6}

# each method's own metrics (StepOutput.metrics), present in every record; tiny_config turns direct-align's inversion
# branch off
OWN_KEYS = {
    "srpo": {"denoise_reward", "denoise_sigma", "denoise_k", "inversion_reward", "inversion_sigma", "inversion_k"},
    "direct-align": {"denoise_reward", "denoise_sigma", "denoise_k"},
    "refl": {"refl_reward", "refl_sigma"},
    "draft-k": {"draft_k_reward", "draft_k_sigma"},
    "draft-lv": {"draft_lv_reward", "draft_lv_sigma"},
    "alignprop": {"alignprop_reward", "alignprop_sigma"},
    "grpo": {"grpo_reward", "grpo_sigma", "grpo_max_ratio_deviation", "grpo_clip_fraction", "grpo_kl",
             "grpo_zero_std_fraction", "grpo_approx_kl", "grpo_dropped_fraction", "grpo_ratio_mean_high",
             "grpo_ratio_mean_mid", "grpo_ratio_mean_low", "grpo_rollout_part"},
    "grpo-fast": {"grpo_reward", "grpo_sigma", "grpo_max_ratio_deviation", "grpo_clip_fraction", "grpo_kl",
                  "grpo_zero_std_fraction", "grpo_approx_kl", "grpo_dropped_fraction", "grpo_ratio_mean_high",
                  "grpo_ratio_mean_mid", "grpo_ratio_mean_low", "grpo_rollout_part"},
    "nft": {"nft_reward", "nft_sigma", "nft_loss_pos", "nft_loss_neg", "nft_kl", "nft_old_deviation",
            "nft_old_drift", "nft_old_decay", "nft_adv_abs", "nft_zero_std_fraction"},
    "dpo": {"dpo_accuracy", "dpo_margin", "dpo_w_diff", "dpo_l_diff", "dpo_sigma", "dpo_ref_age", "dpo_reward_gap",
            "dpo_tie_fraction"},
    "awm": {"awm_advantage_std", "awm_advantage_abs_mean", "awm_mse", "awm_kl", "awm_ema_kl", "awm_ema_decay",
            "awm_sigma", "awm_zero_std_fraction"},
}
ENGINE_KEYS = {"step", "loss", "reward", "grad_norm", "lr", "step_seconds", "skipped", "nfe_no_grad", "nfe_grad"}
# AdamW moves a trained weight by about lr (1e-3) per step; weight decay alone (lr * 1e-4 * |w|) moves it < 1e-6
MOVED_BY_GRADIENT = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: the goldens do not depend on the thread count's reduction order, and on 2 busy shared
    cores a 2-thread run of these tiny models is ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fresh_weights(random_world_dir):
    """The base weights as saved: the generator's components and the reward model, loaded once per module."""
    from diffusers import FluxPipeline
    from transformers import CLIPModel

    pipe = FluxPipeline.from_pretrained(random_world_dir / "generator", local_files_only=True)
    states = {name: getattr(pipe, name).state_dict() for name in ("transformer", "vae", "text_encoder",
                                                                  "text_encoder_2")}
    states["reward"] = CLIPModel.from_pretrained(random_world_dir / "reward").state_dict()
    return states


def _same_state(got: dict, want: dict, label: str) -> None:
    assert set(got) == set(want), f"{label}: different keys"
    for k in want:
        assert torch.equal(got[k], want[k]), f"{label}.{k} changed"


def test_every_registered_method_has_goldens():
    assert set(GOLDEN) == set(OWN_KEYS) == set(METHODS)


@pytest.mark.parametrize("method", list(METHODS))
def test_three_steps_match_goldens_and_change_only_lora(random_world, fresh_weights, tmp_path, monkeypatch, method):
    init, box = {}, {}

    class Snapshot(training.FineTuning):
        """Records the trainable (LoRA) state right after set-up, before any step."""

        @classmethod
        def setup(cls, t, adapter, info):
            ft = super().setup(t, adapter, info)
            init.update({k: v.detach().clone() for k, v in trainable_state(t.finetune, adapter.transformer).items()})
            return ft

    orig_reward = training.load_reward

    def load_reward(*a, **k):
        box["reward"] = orig_reward(*a, **k)
        return box["reward"]

    monkeypatch.setattr(training, "FineTuning", Snapshot)
    monkeypatch.setattr(training, "load_reward", load_reward)
    run = tmp_path / "run"
    result = train(tiny_config(method, f"train.steps={STEPS}", run_dir=run), log=quiet)

    # the trajectory
    rec = read_metrics(run)
    assert [r["step"] for r in rec] == list(range(1, STEPS + 1))
    got = [(r["loss"], r["reward"], r["grad_norm"]) for r in rec]
    for step, ((loss, reward, norm), (g_loss, g_reward, g_norm)) in enumerate(zip(got, GOLDEN[method]), 1):
        assert loss == pytest.approx(g_loss, rel=1e-4, abs=LOSS_ABS.get(method, 1e-7)), f"step {step} loss"
        assert reward == pytest.approx(g_reward, rel=1e-4, abs=1e-7), f"step {step} reward"
        assert norm == pytest.approx(g_norm, rel=1e-4, abs=1e-7), f"step {step} grad_norm"
    for r in rec:
        assert set(r) >= ENGINE_KEYS | OWN_KEYS[method], f"step {r['step']} misses {OWN_KEYS[method] - set(r)}"
        assert not r["skipped"]
        assert all(math.isfinite(r[k]) for k in OWN_KEYS[method])

    # every LoRA tensor moved by training (not just by weight decay); lora_B left zero
    final = load_file(str(run / "checkpoints" / f"step-{STEPS:08d}" / "trainable.safetensors"))
    assert init and set(final) == set(init) and all("lora_" in k for k in init)
    for k in init:
        moved = float((final[k].float() - init[k].float()).abs().max())
        assert moved > MOVED_BY_GRADIENT, f"{k} moved only {moved:.2e}"
        if "lora_B" in k:
            assert not init[k].any() and final[k].abs().max() > 0, k
    # the exported LoRA is the trained one
    exported = load_file(str(Path(run) / "export" / "lora" / "pytorch_lora_weights.safetensors"))
    assert len(exported) == len(final)
    for k, v in final.items():
        assert torch.equal(exported[f"transformer.{k}"].to(v.dtype), v), k

    # every frozen weight is bit-identical to the saved base
    pipe = result.adapter.pipe
    base = {n.replace(".base_layer.", "."): t for n, t in pipe.transformer.state_dict().items() if "lora_" not in n}
    _same_state(base, fresh_weights["transformer"], "transformer")
    for name in ("vae", "text_encoder", "text_encoder_2"):
        _same_state(getattr(pipe, name).state_dict(), fresh_weights[name], name)
    _same_state(box["reward"].model.state_dict(), fresh_weights["reward"], "reward")


@pytest.fixture(scope="module")
def world_parts(random_world_dir):
    """One tiny-world adapter and reward for every method's ``build`` (building does not change them)."""
    from directalign.adapters.loading import load_adapter
    from directalign.rewards.registry import load_reward

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIRECTALIGN_WORLD_DIR", str(random_world_dir))
        cfg = tiny_config("srpo")
        adapter = load_adapter(cfg.model, torch.device("cpu"), torch.float32)
        reward = load_reward(cfg.reward, torch.device("cpu"), "official")
    return adapter, reward


@pytest.mark.parametrize("name", list(METHODS))
def test_registry_builds_a_method_with_nfe(world_parts, name):
    adapter, reward = world_parts
    cfg = tiny_config(name)
    spec = METHODS[name]
    assert spec.name == name and cfg.method == name
    m = spec.build(cfg, adapter, reward)
    assert isinstance(m, Method)
    for b in (1, 2):
        nfe = m.nfe(b)
        assert set(nfe) == {"nfe_no_grad", "nfe_grad"}
        assert all(math.isfinite(v) and v >= 0 for v in nfe.values())
        assert nfe["nfe_grad"] > 0  # every method trains through at least one model call
