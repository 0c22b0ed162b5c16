"""Flow-GRPO as its code does it, and Flow-GRPO-Fast (:mod:`directalign.methods.grpo`): the per-prompt advantage
tracker (per prompt, global std, zero-advantage dropping), flow_grpo's SDE step and log-prob written from its
equations, the KL against its closed form, the Fast window, two optimizer steps per rollout (the ratio leaves 1 and
the clip binds on the second), resume in the middle of a rollout, and the shipped configs."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PROMPTS, build_parts, context, quiet, run_step, tiny_config
from safetensors.torch import load_file

from directalign.config import load_config, packaged_config
from directalign.engine.config import ConfigError
from directalign.logging_utils import read_metrics
from directalign.methods import grpo, grpo_math
from directalign.methods.registry import METHODS
from directalign.training import train

OWN = {"grpo_reward", "grpo_sigma", "grpo_max_ratio_deviation", "grpo_clip_fraction", "grpo_kl", "grpo_approx_kl",
       "grpo_zero_std_fraction", "grpo_dropped_fraction", "grpo_ratio_mean_high", "grpo_ratio_mean_mid",
       "grpo_ratio_mean_low", "grpo_rollout_part"}


# --------------------------------------------------------------------------------------------- advantages
def test_per_prompt_advantages_worked_example():
    # prompt "a" appears in two places: the tracker pools them (rewards 0, 2, 1, 1: mean 1, population std sqrt(.5))
    prompts = ["a", "a", "b", "b", "a", "a"]
    r = torch.tensor([0.0, 2.0, 5.0, 5.0, 1.0, 1.0])
    adv = grpo_math.prompt_advantages(r, prompts, global_std=False, eps=1e-4)
    a = 1 / (math.sqrt(0.5) + 1e-4)
    torch.testing.assert_close(adv, torch.tensor([-a, a, 0.0, 0.0, 0.0, 0.0]))
    # global std: the population std of all six rewards (mean 14/6), the mean still per prompt
    mean_all = 14 / 6
    std_all = math.sqrt(sum((x - mean_all) ** 2 for x in [0, 2, 5, 5, 1, 1]) / 6)
    adv_g = grpo_math.prompt_advantages(r, prompts, global_std=True, eps=1e-4)
    g = 1 / (std_all + 1e-4)
    torch.testing.assert_close(adv_g, torch.tensor([-g, g, 0.0, 0.0, 0.0, 0.0]))
    assert grpo_math.zero_std_fraction(r, prompts) == 0.5  # "b" has equal rewards
    # DanceGRPO's groups: consecutive rows, unbiased std
    d = grpo_math.group_advantages(torch.tensor([0.0, 2.0, 5.0, 5.0]), 2, eps=1e-8)
    torch.testing.assert_close(d, torch.tensor([-1 / (math.sqrt(2) + 1e-8), 1 / (math.sqrt(2) + 1e-8), 0.0, 0.0]))


def test_zero_advantage_samples_are_dropped_and_topped_up_to_the_parts():
    adv = torch.tensor([-1.0, 1.0, 0.0, 0.0, 0.5, 0.0])
    g = torch.Generator().manual_seed(0)
    assert grpo_math.keep_nonzero(adv, 1, g).tolist() == [0, 1, 4]
    kept = grpo_math.keep_nonzero(adv, 2, g)  # 3 non-zero -> one zero-advantage sample joins
    assert len(kept) == 4 and {0, 1, 4} <= set(kept.tolist())
    parts = grpo_math.split_rollout(kept, 2, g)
    assert [len(p) for p in parts] == [2, 2] and sorted(torch.cat(parts).tolist()) == sorted(kept.tolist())
    # all zero: 0 divides by any number of parts, so nothing trains (flow_grpo tops up only a remainder)
    assert len(grpo_math.keep_nonzero(torch.zeros(4), 2, g)) == 0
    # not enough zero-advantage samples to top up: the non-zero ones only
    assert grpo_math.keep_nonzero(torch.tensor([1.0, -1.0, 2.0]), 2, g).tolist() == [0, 1, 2]


# --------------------------------------------------------------------------------------------- SDE, KL
def _flow_grpo_reference(x, v, sigma, sigma_prev, sigma_max, noise_level, prev_sample):
    """Flow-GRPO's SDE step with log-prob (yifan123/flow_grpo@ac4c86e flow_grpo/diffusers_patch/
    sd3_sde_with_logprob.py), written here from its equations: std_t = sqrt(s / (1 - s')) * a with s' = sigma_max
    where s = 1; mean = x (1 + std_t^2 dt / (2 s)) + v (1 + std_t^2 (1 - s) / (2 s)) dt; the log-density of
    N(mean, std_t^2 |dt|) averaged over the non-batch elements."""
    s = sigma.reshape(-1, 1, 1, 1)
    dt = sigma_prev.reshape(-1, 1, 1, 1) - s
    std_t = torch.sqrt(s / (1 - torch.where(s == 1, torch.full_like(s, sigma_max), s))) * noise_level
    mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
    normal = torch.distributions.Normal(mean, std_t * torch.sqrt(-dt))
    return mean, normal.log_prob(prev_sample).mean(dim=(1, 2, 3))


def test_sde_step_log_prob_matches_flow_grpo_equations():
    g = torch.Generator().manual_seed(3)
    x, v = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    sig = torch.tensor([1.0, 0.9, 0.55])
    nxt = torch.tensor([0.9, 0.55, 0.2])
    sigma_max = 0.9  # the schedule's second sigma, flow_grpo's substitute for s = 1
    prev = torch.randn(3, 4, 2, 2, generator=g)
    mean, std = grpo_math.sde_step(x, v, sig, nxt, 0.7, "flow", sigma_max)
    ref_mean, ref_lp = _flow_grpo_reference(x, v, sig, nxt, sigma_max, 0.7, prev)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grpo_math.gaussian_log_prob(prev, mean, std), ref_lp, rtol=1e-5, atol=1e-5)


def test_kl_exact_and_flow_grpo_scale_against_the_closed_form():
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    s, sn = torch.tensor([0.8, 0.5]), torch.tensor([0.6, 0.25])
    gcoef = grpo_math.diffusion_coefficient(s, 0.7, "flow", 0.9)
    std = (gcoef * torch.sqrt(s - sn)).reshape(-1, 1, 1)
    p, q = torch.distributions.Normal(m1, std.expand_as(m1)), torch.distributions.Normal(m2, std.expand_as(m2))
    closed = torch.distributions.kl_divergence(p, q).mean(dim=(1, 2))
    exact = grpo_math.transition_kl(m1, m2, std, s, sn, "exact")
    torch.testing.assert_close(exact, closed, rtol=1e-5, atol=1e-7)
    # flow_grpo divides the squared mean gap by 2 g^2 (its std_dev_t), not by the transition variance g^2 |ds|
    flow = grpo_math.transition_kl(m1, m2, std, s, sn, "flow_grpo")
    by_hand = ((m1 - m2) ** 2).mean(dim=(1, 2)) / (2 * gcoef**2)
    torch.testing.assert_close(flow, by_hand, rtol=1e-5, atol=1e-7)


def test_approx_kl_and_noise_buckets():
    lp, old = torch.tensor([0.1, -0.2]), torch.tensor([0.0, 0.0])
    assert float(grpo_math.approx_kl(lp, old)) == pytest.approx(0.5 * (0.01 + 0.04) / 2)
    assert grpo_math.noise_bucket(torch.arange(9), 9).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


# --------------------------------------------------------------------------------------------- Fast window
def test_fast_window_is_uniform_on_its_range():
    starts = [grpo_math.draw_sde_window(2, 0, 5, torch.Generator().manual_seed(i))[0] for i in range(400)]
    assert set(starts) == {0, 1, 2, 3}  # randint(0, 5 - 2) inclusive
    counts = [starts.count(k) for k in range(4)]
    assert min(counts) > 60  # ~100 each
    assert grpo_math.draw_sde_window(1, 2, 3, torch.Generator().manual_seed(0)) == (2, 3)


def test_fast_rollout_is_ode_outside_the_window_and_trains_only_the_window(random_world):
    cfg = tiny_config("grpo-fast")
    adapter, _reward, m, _params = build_parts(cfg)
    noise = adapter.noise(1, 32, 32, torch.Generator().manual_seed(0))
    prompts = [PROMPTS[0]] * 2
    embeds = adapter.encode_prompts(prompts)
    x = m.initial_noise(noise, torch.Generator().manual_seed(1))
    import random

    ro = m.rollout(embeds, x, prompts, 0, torch.Generator().manual_seed(2), random.Random(0), window=(1, 2))
    velocity = m._velocity(embeds)
    sig = m.sigmas
    v0 = velocity(ro.states[0], torch.full((2,), float(sig[0])))
    torch.testing.assert_close(ro.states[1], grpo_math.ode_step(ro.states[0], v0, float(sig[0]), float(sig[1])))
    assert ro.log_probs[0].abs().max() == 0 and ro.log_probs[2].abs().max() == 0
    assert torch.isfinite(ro.log_probs[1]).all() and ro.log_probs[1].abs().min() > 0
    assert m.train_timesteps(2, torch.Generator(), (1, 3)).tolist() == [[1, 2], [1, 2]]
    # one step (window of 1 in [0, 2)): the trained sigma is a window sigma; half the samples train (two parts)
    out = run_step(m, 0, PROMPTS[:1], 4)
    assert any(out.metrics["grpo_sigma"] == pytest.approx(float(sig[i])) for i in (0, 1))
    assert m.nfe(1) == {"nfe_no_grad": 4 * 2 / 2, "nfe_grad": 1 * 2 / 2}


# --------------------------------------------------------------------------------------------- two updates
def _adam_step(params, lr=1e-2):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.add_(-lr * p.grad.sign())
                p.grad = None


def test_two_optimizer_steps_per_rollout_move_the_ratio_and_bind_the_clip(random_world):
    cfg = tiny_config("grpo", "grpo.updates_per_rollout=2", "grpo.group_size=3", "grpo.clip_range=1e-6",
                      "grpo.advantage=per_prompt", "grpo.advantage_eps=1e-4")
    adapter, _reward, m, params = build_parts(cfg)
    calls = {"n": 0}
    orig = adapter.velocity

    def counted(x, *a, **k):
        calls["n"] += 1
        return orig(x, *a, **k)

    adapter.velocity = counted
    first = m.train_step(context(0, PROMPTS[:1]), lambda loss: loss.backward())
    rollout_calls = calls["n"]
    buf = m._buffer
    assert buf is not None and sorted(buf["order"].tolist()) == list(range(3)) and buf["sizes"].tolist() == [2, 1]
    assert first.metrics["grpo_rollout_part"] == 0.0
    assert first.metrics["grpo_max_ratio_deviation"] < 1e-5  # on-policy: ratio 1 up to rounding
    _adam_step(params)
    calls["n"] = 0
    second = m.train_step(context(1, PROMPTS[1:]), lambda loss: loss.backward())
    assert second.metrics["grpo_rollout_part"] == 1.0 and m._buffer is None
    assert calls["n"] == 2  # no new rollout: one training call per trained transition (2) of the one sample
    assert rollout_calls > calls["n"]
    assert second.reward == first.reward  # the same rollout's rewards
    assert second.metrics["grpo_max_ratio_deviation"] > 1e-4  # the policy moved since the rollout
    assert second.metrics["grpo_clip_fraction"] > 0
    assert second.metrics["grpo_approx_kl"] > 0
    assert set(second.metrics) == OWN
    trained = [second.metrics[f"grpo_ratio_mean_{b}"] for b in grpo.BUCKETS]
    assert any(abs(r - 1) > 1e-6 for r in trained)


def test_constant_rewards_drop_every_sample(random_world):
    from directalign.rewards.base import Reward

    class Constant(Reward):
        text_conditioned = True
        name = "constant"

        def encode_images(self, images):
            return images.detach().mean(dim=(1, 2, 3)) * 0 + 0.5

        def score_texts(self, state, texts):
            return state

    cfg = tiny_config("grpo", "grpo.drop_zero_advantage=true", "grpo.advantage=global_std")
    adapter, _, _, _params = build_parts(cfg)
    m = METHODS["grpo"].build(cfg, adapter, Constant())
    seen = []
    out = m.train_step(context(0, PROMPTS[:1]), seen.append)
    assert out.loss == 0.0 and seen == []  # nothing to train, no backward
    assert out.metrics["grpo_dropped_fraction"] == 1.0 and out.metrics["grpo_zero_std_fraction"] == 1.0


# --------------------------------------------------------------------------------------------- engine
def _ckpt(run, step):
    return load_file(str(run / "checkpoints" / f"step-{step:08d}" / "trainable.safetensors"))


@pytest.mark.parametrize("method,extra", [("grpo", ["grpo.updates_per_rollout=2", "grpo.drop_zero_advantage=true",
                                                    "grpo.advantage=per_prompt", "grpo.kl_beta=0.1"]),
                                          ("grpo-fast", [])])
def test_resume_between_the_parts_of_a_rollout_is_exact(random_world, tmp_path, method, extra):
    def cfg(run):
        return tiny_config(method, "train.steps=4", "run.checkpoint_every=1", *extra, run_dir=run)

    a, b = tmp_path / "straight", tmp_path / "resumed"
    train(cfg(a), log=quiet)
    train(cfg(b), log=quiet, max_steps_this_session=1)  # stops after part 0 of the first rollout
    assert (b / "checkpoints" / "step-00000001" / "method.safetensors").is_file()
    assert not (b / "checkpoints" / "step-00000002").exists()
    train(cfg(b), resume=True, log=quiet, max_steps_this_session=2)  # part 1 from the checkpoint, then a rollout
    train(cfg(b), resume=True, log=quiet)
    want, got = _ckpt(a, 4), _ckpt(b, 4)
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    ra, rb = read_metrics(a), read_metrics(b)
    assert [(r["step"], r["loss"], r["grpo_rollout_part"]) for r in rb] == \
        [(r["step"], r["loss"], r["grpo_rollout_part"]) for r in ra]
    assert [r["grpo_rollout_part"] for r in ra] == [0.0, 1.0, 0.0, 1.0]


def test_state_dict_round_trip_restores_the_rollout(random_world):
    cfg = tiny_config("grpo", "grpo.updates_per_rollout=2")
    adapter, reward, m, _params = build_parts(cfg)
    assert m.state_dict() == {}
    m.train_step(context(0, PROMPTS[:1]), lambda loss: loss.backward())
    state = m.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    m2 = METHODS["grpo"].build(cfg, adapter, reward)
    m2.load_state_dict(state)
    for k in ("states", "log_probs", "advantages", "chosen", "order", "sizes"):
        assert torch.equal(m2._buffer[k], m._buffer[k]), k
    assert m2._buffer["prompts"] == m._buffer["prompts"] and m2._buffer["start"] == 0


# --------------------------------------------------------------------------------------------- configs
def test_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="grpo.updates_per_rollout"):
        tiny_config("grpo", "grpo.updates_per_rollout=0")
    with pytest.raises(ConfigError, match="sde_window_range"):
        tiny_config("grpo", "grpo.sde_window_size=3", "grpo.sde_window_range=[0,2]")
    with pytest.raises(ConfigError, match="grpo_fast.sde_window_size"):
        tiny_config("grpo-fast", "grpo_fast.sde_window_size=0")


@pytest.mark.parametrize("name", ["tiny-grpo", "tiny-flow-grpo", "tiny-grpo-fast"])
def test_tiny_configs_train_two_steps(random_world, tmp_path, name):
    section = "grpo_fast" if name.endswith("fast") else "grpo"
    cheap = ["train.steps=2", "eval.before=false", "run.report=false", "run.progress=false", "eval.seeds=[0]",
             "eval.steps=2", "eval.best_of=1", f"{section}.sampling_steps=4", f"{section}.group_size=2",
             "train.batch_size=1", f"run.output_dir={tmp_path / 'run'}"]
    if section == "grpo_fast":
        cheap.append("grpo_fast.sde_window_range=[0,2]")
    cfg = load_config(packaged_config(name), cheap)
    train(cfg, log=quiet)
    rec = read_metrics(tmp_path / "run")
    assert len(rec) == 2 and all(set(r) >= OWN for r in rec)


@pytest.mark.parametrize("name,family", [("sd35-flow-grpo", "sd3"), ("flux-dev-flow-grpo", "flux"),
                                         ("sd35-flow-grpo-fast", "sd3")])
def test_real_model_config_runs_a_step_on_a_tiny_pipeline_of_its_family(name, family, random_world):
    """The shipped real-model config, with a tiny pipeline instead of the hub weights and a cheap schedule."""
    from directalign.adapters.flux import FluxAdapter
    from directalign.adapters.sd3 import SD3Adapter
    from directalign.adapters.tiny import tiny_sd3_pipeline
    from directalign.engine.finetune import apply_finetune_mode
    from directalign.rewards.registry import load_reward

    cfg = load_config(packaged_config(name))
    g = cfg.method_section
    assert cfg.model.family == family and cfg.train.learning_rate == 3e-4 and g.clip_range in (1e-4, 1e-5)
    assert g.sde == "flow" and g.advantage in ("per_prompt", "global_std") and g.drop_zero_advantage
    assert g.updates_per_rollout == 2
    s = cfg.method_section.__class__.__name__ == "GRPOFastConfig" and "grpo_fast" or "grpo"
    cheap = ["model.height=32", "model.width=32", "model.dtype=float32", "model.max_sequence_length=16",
             f"{s}.group_size=2", f"{s}.sampling_steps=4", "train.lora_rank=2", "train.lora_alpha=4",
             "train.mixed_precision=no", "reward.kind=tiny-world", "reward.path=tiny-world", "reward.form=absolute",
             "train.batch_size=1"]
    if s == "grpo_fast":
        cheap += ["grpo_fast.sde_window_range=[0,2]", "grpo_fast.sde_window_size=1"]
    cfg = load_config(packaged_config(name), cheap)
    if family == "sd3":
        adapter = SD3Adapter(tiny_sd3_pipeline(0), max_sequence_length=16)
    else:
        from diffusers import FluxPipeline

        from directalign.world import architecture as arch

        torch.manual_seed(0)
        adapter = FluxAdapter(FluxPipeline(**arch.new_generator_components()), max_sequence_length=16)
    reward = load_reward(cfg.reward, torch.device("cpu"), "absolute")
    method = METHODS[cfg.method].build(cfg, adapter, reward)
    params = apply_finetune_mode(cfg.train, adapter)
    with torch.no_grad():
        for n, p in adapter.transformer.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = method.train_step(context(0, ["a red circle"]), lambda loss: loss.backward())
    assert math.isfinite(out.loss) and set(out.metrics) == OWN
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in params)


def test_cfg_in_training_off_samples_and_trains_without_cfg_on_a_true_cfg_model(random_world):
    from directalign.adapters.sd3 import SD3Adapter
    from directalign.adapters.tiny import tiny_sd3_pipeline

    adapter = SD3Adapter(tiny_sd3_pipeline(0), max_sequence_length=16)
    base = ["model.family=sd3", "grpo.guidance=4.5", "grpo.group_size=2", "grpo.sampling_steps=3"]
    seen = []
    orig = adapter._forward

    def forward(x, *a, **k):
        seen.append(x.shape[0])
        return orig(x, *a, **k)

    adapter._forward = forward
    for flag, rows in (("true", 4), ("false", 2)):  # CFG doubles the batch of each call
        cfg = tiny_config("grpo", *base, f"grpo.cfg_in_training={flag}")
        m = METHODS["grpo"].build(cfg, adapter, None)
        assert m.guidance == (4.5 if flag == "true" else 1.0)
        seen.clear()
        x = adapter.noise(2, 32, 32, torch.Generator().manual_seed(0))
        m._velocity(adapter.encode_prompts(["a", "b"]))(x, torch.full((2,), 0.5))
        assert seen == [rows]


def _rank_std(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        rewards = torch.tensor([[0.0, 1.0, 5.0], [2.0, 2.0, 9.0]][rank])
        std = grpo_math.all_ranks_std(rewards)
        adv = grpo_math.prompt_advantages(rewards, ["a", "a", "b"], True, 1e-4, std)
        torch.save({"std": std, "adv": adv}, f"{out}-{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_global_std_is_over_every_process(tmp_path):
    """Two gloo processes: the global std is the population std of both processes' rewards (flow_grpo gathers)."""
    import torch.multiprocessing as mp

    assert grpo_math.all_ranks_std(torch.tensor([1.0, 2.0])) is None  # one process: the local std is used
    out = str(tmp_path / "res")
    mp.spawn(_rank_std, args=(f"file://{tmp_path / 'store'}", out), nprocs=2, join=True)
    want = torch.tensor([0.0, 1.0, 5.0, 2.0, 2.0, 9.0], dtype=torch.float64).std(unbiased=False).item()
    for rank, rewards in enumerate(([0.0, 1.0, 5.0], [2.0, 2.0, 9.0])):
        got = torch.load(f"{out}-{rank}.pt", weights_only=True)
        assert got["std"] == pytest.approx(want, rel=1e-12)
        a, b = rewards[0], rewards[1]
        mean = (a + b) / 2
        torch.testing.assert_close(got["adv"], torch.tensor([(a - mean) / (want + 1e-4), (b - mean) / (want + 1e-4),
                                                             0.0]))
