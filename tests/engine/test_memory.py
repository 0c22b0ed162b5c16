"""Host memory between steps (``directalign.engine.memory``) and the step loop's use of it: glibc's malloc_trim
after the first step and after held-out samples, gradients freed with their step, prompts encoded before the first
step when asked."""

from __future__ import annotations

import platform

import pytest
import torch
from helpers import PROMPTS, build_parts, quiet, tiny_config

from directalign.engine import loop as loop_module
from directalign.engine import memory
from directalign.engine.context import PromptSampler
from directalign.engine.distributed import DistInfo
from directalign.engine.finetune import FineTuning
from directalign.engine.loop import StepLoop


@pytest.fixture
def fresh_trim(monkeypatch):
    """Forget the cached malloc_trim lookup for one test (and restore it after)."""
    monkeypatch.setattr(memory, "_TRIM", None)


def test_release_calls_malloc_trim_with_zero_padding(fresh_trim, monkeypatch):
    calls = []

    def fake_trim(pad):
        calls.append(pad)
        return 1

    monkeypatch.setattr(memory, "_TRIM", fake_trim)
    assert memory.release_freed_memory() is True
    assert calls == [0]  # pad 0: give back every free page at the top of the heap and inside every arena


def test_release_is_a_no_op_without_glibc(fresh_trim, monkeypatch):
    monkeypatch.setattr(platform, "libc_ver", lambda *a, **k: ("", ""))

    def no_libc(*_a, **_k):
        raise AssertionError("libc must not be loaded on another C library")

    monkeypatch.setattr(memory.ctypes, "CDLL", no_libc)
    assert memory.release_freed_memory() is False
    assert memory._TRIM is False  # remembered: later calls cost nothing


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_release_on_this_glibc_returns_freed_pages(fresh_trim):
    blocks = [bytearray(256 * 1024) for _ in range(64)]  # 16 MiB from the heap / mmap, then freed
    del blocks
    assert isinstance(memory.release_freed_memory(), bool)
    assert memory._TRIM not in (None, False)  # the real malloc_trim was found


def test_session_prompts_are_the_sampler_batches():
    items = [f"prompt {i}" for i in range(10)]
    sampler = PromptSampler(items, 2, seed=3, shuffle=True)
    expected = {p for step in range(1, 3) for p in sampler.batch(step)}
    assert memory.session_prompts(sampler, 1, 3) == sorted(expected)
    assert len(expected) == 4  # 2 steps x 2 distinct prompts of one shuffled epoch
    assert memory.session_prompts(sampler, 0, 6) == sorted(items)  # more than an epoch: all of them


def test_precompute_encodes_in_batches_and_releases(monkeypatch):
    batches, released = [], []

    class Adapter:
        def encode_prompts(self, prompts):
            batches.append(list(prompts))

    monkeypatch.setattr(memory, "release_freed_memory", lambda: released.append(1) or True)
    assert memory.precompute_prompt_embeddings(Adapter(), ["a", "b", "c"], 2) == 3
    assert batches == [["a", "b"], ["c"]] and released == [1]


def _loop(tmp_path, precompute: bool = False, *overrides: str):
    cfg = tiny_config("srpo", "train.finetune=lora", *overrides, run_dir=tmp_path)
    adapter, _, method, _ = build_parts(cfg, finetune=False)
    ft = FineTuning.setup(cfg.train, adapter, DistInfo())
    sampler = PromptSampler(PROMPTS * 2, cfg.train.batch_size, cfg.train.seed, False)
    loop = StepLoop(train_cfg=cfg.train, run_cfg=cfg.run, method=method, ft=ft, sampler=sampler,
                    device=torch.device("cpu"), run_dir=tmp_path, checkpoint_state=lambda step: {},
                    extra_metrics=dict, log=quiet, after_step=lambda step: None, precompute_prompts=precompute)
    loop.save = lambda step: None
    return loop, adapter, ft


def test_one_step_updates_the_weights_and_frees_the_gradients(random_world, tmp_path):
    loop, _, ft = _loop(tmp_path)
    before = [p.detach().clone() for p in ft.params]
    _, grad_norm, finite = loop.one_step(0)
    assert finite and grad_norm > 0
    assert any(not torch.equal(b, p) for b, p in zip(before, ft.params))  # the step used its gradients
    assert all(p.grad is None for p in ft.params)  # and freed them: nothing stays alive until the next step


def test_trim_after_the_first_step_and_after_held_out_samples(random_world, tmp_path, monkeypatch):
    calls = []
    loop, _, _ = _loop(tmp_path, False, "run.sample_every=2")
    monkeypatch.setattr(loop_module, "release_freed_memory", lambda: calls.append(len(calls)) or True)
    steps_seen, trims_at = [], []
    loop.after_step = lambda step: (steps_seen.append(step), trims_at.append(len(calls)))
    loop.run(0, 3, False, None)
    assert steps_seen == [1, 2, 3]
    # after step 1's trim (1 call before its after_step); step 2's samples are followed by one more
    assert trims_at == [1, 1, 2] and len(calls) == 2


@pytest.mark.parametrize("precompute", [True, False])
def test_precomputed_prompts_keep_the_text_encoders_out_of_the_steps(random_world, tmp_path, precompute):
    loop, adapter, _ = _loop(tmp_path, precompute)
    calls = {"in_step": 0, "before": 0}
    in_step = [False]

    def count(*_a):
        calls["in_step" if in_step[0] else "before"] += 1

    adapter.pipe.text_encoder_2.register_forward_pre_hook(count)
    train_step = loop.method.train_step

    def tracked(ctx, backward):
        in_step[0] = True
        try:
            return train_step(ctx, backward)
        finally:
            in_step[0] = False

    loop.method.train_step = tracked
    loop.run(0, 2, False, None)
    assert sorted(adapter._cache) == sorted(PROMPTS)  # the same cache either way
    if precompute:
        assert calls == {"in_step": 0, "before": 1}  # one batch of both prompts, before step 1
    else:
        assert calls["before"] == 0 and calls["in_step"] >= 1


@pytest.mark.parametrize("precompute", [True, False])
def test_train_precompute_prompts_reaches_the_loop(random_world, tmp_path, monkeypatch, precompute):
    """``train.precompute_prompts`` is what decides whether a training run encodes its prompts before step 1."""
    from directalign.training import train

    encoded = []
    real = loop_module.precompute_prompt_embeddings
    monkeypatch.setattr(loop_module, "precompute_prompt_embeddings",
                        lambda adapter, prompts, batch: encoded.append(list(prompts)) or real(adapter, prompts, batch))
    cfg = tiny_config("srpo", "train.steps=1", "eval.seeds=[0]", "run.report=false",
                      f"train.precompute_prompts={str(precompute).lower()}", run_dir=tmp_path / "run")
    train(cfg, log=quiet)
    assert len(encoded) == (1 if precompute else 0)
    if precompute:  # one step of batch_size prompts: exactly the prompts that step reads
        assert len(encoded[0]) == len(set(encoded[0])) and 1 <= len(encoded[0]) <= cfg.train.batch_size
