"""``srpo.rollout_reuse``: one online rollout feeds several optimizer steps, each at its own window draw; the held
rollout is method state, so resume between two rollouts is exact."""

from __future__ import annotations

import pytest
import torch
from helpers import PROMPTS, build_parts, quiet, run_step, tiny_config
from safetensors.torch import load_file

from directalign.errors import TrainingError
from directalign.logging_utils import read_metrics
from directalign.methods.rollout_buffer import Rollout, RolloutBuffer, is_rollout_step
from directalign.training import train

OTHER = ["a red square on blue", "a green circle on white", "a blue triangle on black", "a ☃ snowman"]


def _record_rollouts(monkeypatch, method) -> list:
    """(step-independent) log of every ``clean_latents`` call: the prompts it rolled out and its x0."""
    calls, original = [], method.clean_latents

    def recording(embeds, noise):
        x0 = original(embeds, noise)
        calls.append((noise.clone(), x0.clone()))
        return x0

    monkeypatch.setattr(method, "clean_latents", recording)
    return calls


def _record_pairs(monkeypatch, method) -> list:
    """Every branch's (x0, noise, prompts, denoise query sigma) as the step hands them to ``branch_loss``."""
    seen, original = [], method.branch_loss

    def recording(name, x0, noise, embeds, prompts, draw, words, share):
        seen.append((name, x0.clone(), noise.clone(), list(prompts), draw.denoise_query))
        return original(name, x0, noise, embeds, prompts, draw, words, share)

    monkeypatch.setattr(method, "branch_loss", recording)
    return seen


def test_rollout_steps_are_every_reuse_th():
    assert [s for s in range(10) if is_rollout_step(s, 3)] == [0, 3, 6, 9]
    assert all(is_rollout_step(s, 1) for s in range(5))


def test_one_rollout_feeds_reuse_steps_at_new_window_draws(random_world, monkeypatch):
    cfg = tiny_config("srpo", "srpo.rollout_reuse=3", "srpo.hinge_threshold=5.0")
    _, _, method, _ = build_parts(cfg)
    rollouts, pairs = _record_rollouts(monkeypatch, method), _record_pairs(monkeypatch, method)
    for step in range(4):
        run_step(method, step=step, prompts=PROMPTS if step % 3 == 0 else OTHER[: len(PROMPTS)])
    assert len(rollouts) == 2  # steps 0 and 3 roll out; steps 1 and 2 reuse step 0's
    denoise = [p for p in pairs if p[0] == "denoise"]
    assert len(denoise) == 4
    x0_0, noise_0 = rollouts[0][1], rollouts[0][0]
    for _name, x0, noise, prompts, _ in denoise[:3]:
        assert torch.equal(x0, x0_0) and torch.equal(noise, noise_0)
        assert prompts == PROMPTS  # the rollout's own prompts, not the step's
    assert torch.equal(denoise[3][1], rollouts[1][1]) and not torch.equal(denoise[3][1], x0_0)
    assert len({p[4] for p in denoise[:3]}) == 3  # each reusing step draws its own window position


def test_reuse_one_holds_nothing_and_rolls_out_every_step(random_world, monkeypatch):
    cfg = tiny_config("srpo", "srpo.hinge_threshold=5.0")
    _, _, method, _ = build_parts(cfg)
    rollouts = _record_rollouts(monkeypatch, method)
    for step in range(3):
        run_step(method, step=step)
    assert len(rollouts) == 3
    assert method.state_dict() == {}


def test_nfe_spreads_the_rollout_over_its_steps(random_world):
    for reuse in (1, 4):
        cfg = tiny_config("srpo", f"srpo.rollout_reuse={reuse}", "srpo.rollout_steps=8")
        _, _, method, _ = build_parts(cfg)
        assert method.nfe(2) == {"nfe_no_grad": 8 * 2 / reuse, "nfe_grad": 2 * 2}


def test_buffer_state_round_trip_and_stale_rollouts_are_not_reused():
    buf = RolloutBuffer(4)
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    buf.put(Rollout(4, ["un café", "a ☃"], x0, noise))
    assert buf.get(4) is None and buf.get(5) is not None and buf.get(7) is not None
    assert buf.get(9) is None  # step 8 starts a new period: the step-4 rollout is stale
    state = buf.state_dict()
    assert set(state) == {f"rollout.rank0.{k}" for k in ("step", "prompts", "x0", "noise")}
    back = RolloutBuffer(4)
    back.load_state_dict(state, 0, torch.device("cpu"))
    assert back.last.step == 4 and back.last.prompts == ["un café", "a ☃"]
    assert torch.equal(back.last.x0, x0) and torch.equal(back.last.noise, noise)
    with pytest.raises(TrainingError, match="same number of processes"):
        RolloutBuffer(4).load_state_dict(state, 1, torch.device("cpu"))
    empty = RolloutBuffer(4)
    empty.load_state_dict({}, 0, torch.device("cpu"))
    assert empty.last is None


def test_resume_between_rollouts_is_exact(random_world, tmp_path):
    """reuse 3, stop after step 2 (mid-period), resume to 5 == 5 straight steps, bit for bit; the checkpoint holds
    the rollout, and resuming without it (a fresh rollout at step 2) trains other weights."""
    extra = ("srpo.rollout_reuse=3", "train.steps=5", "run.checkpoint_every=2")
    straight, split, lost = tmp_path / "straight", tmp_path / "split", tmp_path / "lost"
    train(tiny_config("srpo", *extra, run_dir=straight), log=quiet)
    for d in (split, lost):
        train(tiny_config("srpo", *extra, run_dir=d), log=quiet, max_steps_this_session=2)
    held = load_file(str(split / "checkpoints" / "step-00000002" / "method.safetensors"))
    assert int(held["rollout.rank0.step"][0]) == 0
    (lost / "checkpoints" / "step-00000002" / "method.safetensors").unlink()
    for d in (split, lost):
        train(tiny_config("srpo", *extra, run_dir=d), resume=True, log=quiet)
    a = load_file(str(straight / "checkpoints" / "step-00000005" / "trainable.safetensors"))
    b = load_file(str(split / "checkpoints" / "step-00000005" / "trainable.safetensors"))
    c = load_file(str(lost / "checkpoints" / "step-00000005" / "trainable.safetensors"))
    assert set(a) == set(b) and a
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert [r["loss"] for r in read_metrics(straight)] == [r["loss"] for r in read_metrics(split)]
