"""Checkpoints survive a process dying at any point of a save, a full disk, and retention.

The subprocess kill harness (tests/test_kill_resume.py, slow) kills real training runs at random moments; these
tests kill a save *deterministically* at every point between its writes and renames (a ``BaseException`` raised
from the test hook, which no cleanup code catches, leaves the directory exactly as SIGKILL would), so every
intermediate state is checked on each run of the fast suite.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError

from directalign.cli import main
from directalign.engine import checkpoint as ckpt


class _Killed(BaseException):
    """Stands in for SIGKILL: nothing catches it, so no cleanup runs."""


def _optimizer(value: float = 1.0):
    p = torch.nn.Parameter(torch.full((3,), value))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def _save(root: Path, step: int, value: float, keep: int = 2, ema: bool = True) -> Path:
    opt, sched = _optimizer(value)
    return ckpt.save_checkpoint(root, step, {"w": torch.full((2,), value)}, opt, sched, {"tag": value},
                                ema={"w": torch.full((2,), -value)} if ema else None, keep=keep)


def _value(path: Path) -> float:
    loaded = ckpt.load_checkpoint(path)
    w = loaded["trainable"]["w"]
    assert torch.equal(w, torch.full((2,), w[0].item()))
    assert torch.equal(loaded["ema"]["w"], -w)
    assert loaded["state"]["tag"] == w[0].item()
    return w[0].item()


def _listing(root: Path) -> dict[int, float]:
    """Every listed checkpoint must load completely; returns {step: value}."""
    out = {}
    for p in ckpt.checkpoint_dirs(root):
        out[ckpt._step_of(p)] = _value(p)
    return out


def _kill_at_pause(monkeypatch, n: int) -> dict:
    calls = {"n": 0}

    def pause():
        calls["n"] += 1
        if calls["n"] == n:
            raise _Killed

    monkeypatch.setattr(ckpt, "_test_pause", pause)
    return calls


# Pause points of a save with EMA: after trainable, ema, optimizer, lr_scheduler, rng, state.json; a re-save has
# one more between moving the old copy aside and moving the new one in.
NEW_SAVE_POINTS = range(1, 7)
RESAVE_POINTS = range(1, 8)


@pytest.mark.parametrize("point", NEW_SAVE_POINTS)
def test_killed_new_save_keeps_previous_checkpoints(tmp_path, monkeypatch, point):
    root = tmp_path / "ck"
    _save(root, 1, 1.0)
    _save(root, 2, 2.0)
    calls = _kill_at_pause(monkeypatch, point)
    with pytest.raises(_Killed):
        _save(root, 3, 3.0)
    assert calls["n"] == point
    assert _listing(root) == {1: 1.0, 2: 2.0}, "a partial checkpoint is listed or a complete one vanished"
    assert ckpt.latest_checkpoint(root).name == "step-00000002"
    assert list(root.glob(".tmp-step-00000003-*")), "the kill did not land inside the save"
    monkeypatch.setattr(ckpt, "_test_pause", lambda: None)
    _save(root, 3, 3.0)
    assert _listing(root) == {2: 2.0, 3: 3.0}
    assert not list(root.glob(".tmp-*")), "the next save did not clean the partial directory"


@pytest.mark.parametrize("point", RESAVE_POINTS)
def test_killed_resave_always_leaves_a_complete_copy(tmp_path, monkeypatch, point):
    root = tmp_path / "ck"
    _save(root, 1, 1.0)
    _save(root, 2, 2.0)
    _kill_at_pause(monkeypatch, point)
    with pytest.raises(_Killed):
        _save(root, 2, 20.0)  # re-save step 2 with other contents
    listing = _listing(root)
    assert set(listing) == {1, 2}, f"step 2 vanished after a kill at point {point}: {listing}"
    assert listing[2] in (2.0, 20.0)
    if point == 7:  # between the two renames: only the moved-aside old copy holds step 2
        assert not (root / "step-00000002").exists()
        assert ckpt.latest_checkpoint(root).name.startswith(".tmp-old-step-00000002-")
        # resume would load it
        assert _value(ckpt.latest_checkpoint(root)) == 2.0
    monkeypatch.setattr(ckpt, "_test_pause", lambda: None)
    _save(root, 3, 3.0, keep=3)
    assert _listing(root) == {1: 1.0, 2: listing[2], 3: 3.0}
    assert (root / "step-00000002").is_dir(), "the interrupted re-save was not restored under its own name"
    assert not list(root.glob(".tmp-*"))


def test_killed_while_deleting_an_old_checkpoint(tmp_path, monkeypatch):
    """Retention renames a checkpoint away before deleting it: a half-deleted one is never listed."""
    root = tmp_path / "ck"
    _save(root, 1, 1.0)
    _save(root, 2, 2.0)
    real_rmtree = shutil.rmtree

    def half_rmtree(path, *a, **k):
        path = Path(path)
        if path.name.startswith(".tmp-del-"):
            (path / "trainable.safetensors").unlink()  # the deletion got this far, then the process died
            raise _Killed
        return real_rmtree(path, *a, **k)

    monkeypatch.setattr(ckpt.shutil, "rmtree", half_rmtree)
    with pytest.raises(_Killed):
        _save(root, 3, 3.0)
    assert _listing(root) == {2: 2.0, 3: 3.0}
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    _save(root, 4, 4.0)
    assert _listing(root) == {3: 3.0, 4: 4.0}
    assert not list(root.glob(".tmp-*"))


def test_leftover_old_copy_from_an_interrupted_resave_is_recovered(tmp_path):
    """The state an older version could leave: step N moved aside as .tmp-old-*, the new copy never moved in."""
    root = tmp_path / "ck"
    _save(root, 5, 5.0)
    _save(root, 6, 6.0)
    (root / "step-00000006").rename(root / ".tmp-old-step-00000006-4242")
    shutil.copytree(root / "step-00000005", root / ".tmp-step-00000006-4242")  # a stray temporary directory
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-00000005", ".tmp-old-step-00000006-4242"]
    assert _listing(root) == {5: 5.0, 6: 6.0}
    _save(root, 7, 7.0, keep=3)
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-00000005", "step-00000006", "step-00000007"]
    assert _listing(root) == {5: 5.0, 6: 6.0, 7: 7.0}
    assert not list(root.glob(".tmp-*"))
    # a superseded old copy (the new one did move in) is deleted, never restored over the new one
    shutil.copytree(root / "step-00000005", root / ".tmp-old-step-00000007-99")
    _save(root, 8, 8.0, keep=3)
    assert _listing(root) == {6: 6.0, 7: 7.0, 8: 8.0}
    assert not list(root.glob(".tmp-*"))


def test_step_dirs_without_state_or_with_foreign_names_are_ignored(tmp_path):
    root = tmp_path / "ck"
    _save(root, 1, 1.0)
    (root / "step-00000009").mkdir()
    (root / "step-latest").mkdir()
    (root / "step-latest" / "state.json").write_text("{}")
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-00000001"]


# ------------------------------------------------------------------------------------------------- disk full
def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _torch_save_full(*_a, **_k):  # what torch.save raises on a full disk
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")


def _safetensors_full(*_a, **_k):  # what safetensors raises on a full disk
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


@pytest.mark.parametrize("target,fake", [
    ("save_file", _enospc), ("save_file", _safetensors_full), ("torch_save", _enospc),
    ("torch_save", _torch_save_full),
])
def test_disk_full_keeps_previous_checkpoint(tmp_path, monkeypatch, target, fake):
    root = tmp_path / "ck"
    _save(root, 1, 1.0)
    if target == "save_file":
        monkeypatch.setattr(ckpt, "save_file", fake)
    else:
        monkeypatch.setattr(ckpt.torch, "save", fake)
    with pytest.raises(ckpt.CheckpointError) as e:
        _save(root, 2, 2.0)
    msg = str(e.value)
    assert "\n" not in msg
    assert "step-00000002" in msg and "free disk space" in msg and "step-00000001 is intact" in msg
    assert _listing(root) == {1: 1.0}
    assert not list(root.glob(".tmp-*")), "the failed save left its temporary directory"


def test_disk_full_on_state_json_and_on_first_checkpoint(tmp_path, monkeypatch):
    root = tmp_path / "ck"
    real = Path.write_text

    def full(self, *a, **k):
        if self.name == ckpt.STATE_FILE:
            _enospc()
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(ckpt.CheckpointError, match="no earlier checkpoint exists"):
        _save(root, 1, 1.0)
    assert _listing(root) == {}
    assert not list(root.glob(".tmp-*"))


def test_disk_full_during_training_through_the_cli(random_world, tmp_path, monkeypatch, capsys):
    """The run stops at the failed save with one clear line and exit status 2; the last good checkpoint loads."""
    calls = {"n": 0}
    real = ckpt.save_file

    def flaky(tensors, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint (trainable only: no EMA)
            real(tensors, path, *a, **k)
            _enospc()
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    run = tmp_path / "run"
    argv = ["train"]
    for s in ("train.steps=5", "train.batch_size=1", "srpo.rollout_steps=2", "srpo.grid_points=40",
              "srpo.window_margin=2", "eval.before=false", "run.checkpoint_every=1", "run.progress=false",
              "run.keep_checkpoints=1", "train.lora_rank=4", f"run.output_dir={run}"):
        argv += ["--set", s]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("directalign: error: could not write checkpoint"), err
    assert "Traceback" not in err + out
    assert "No space left on device" in lines[0] and "step-00000002 is intact" in lines[0]
    root = run / "checkpoints"
    assert [p.name for p in ckpt.checkpoint_dirs(root)] == ["step-00000002"]  # keep=1 kept the only good one
    assert ckpt.load_checkpoint(root / "step-00000002")["state"]["step"] == 2
    assert not list(root.glob(".tmp-*"))


# ------------------------------------------------------------------------------------------------- retention
@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 4)), min_size=1, max_size=8))
def test_retention_never_deletes_the_only_or_the_newest_checkpoint(tmp_path_factory, saves):
    root = tmp_path_factory.mktemp("ret") / "ck"
    present: set[int] = set()
    for step, keep in saves:
        opt, sched = _optimizer(float(step))
        ckpt.save_checkpoint(root, step, {"w": torch.full((2,), float(step))}, opt, sched, {}, keep=keep)
        listed = [ckpt._step_of(p) for p in ckpt.checkpoint_dirs(root)]
        present.add(step)
        expected = sorted(present)[-keep:]
        if step not in expected:
            expected = sorted(expected + [step])
        assert listed == expected
        assert step in listed and max(present) in listed  # the one just written, and the newest
        present = set(listed)
        for p in ckpt.checkpoint_dirs(root):
            assert ckpt.load_checkpoint(p)["trainable"]["w"][0].item() == ckpt._step_of(p)
        assert not list(root.glob(".tmp-*"))
