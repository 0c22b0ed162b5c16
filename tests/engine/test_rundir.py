"""The run directory's guards: --overwrite replaces only a directalign run (never the current directory, a parent of
it, home, a root or a folder of runs), and a live run's lock keeps a second process out, dies with its holder, and
survives the overwrite that empties the directory around it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from directalign import __version__
from directalign.engine.rundir import (LOCK_FILE, MARKER, RunDirError, RunDirLock, check_run_dir, is_run_dir,
                                       lock_holder, prepare_run_dir)
from directalign.errors import UserError

# A holder in another process: takes the lock, says so, and sleeps until killed.
_HOLDER = ("import sys, time\n"
           "from directalign.engine.rundir import RunDirLock\n"
           "RunDirLock(sys.argv[1]).acquire()\n"
           "print('ready', flush=True)\n"
           "time.sleep(600)\n")


@pytest.fixture
def holder():
    """Start a process holding the lock of a directory; every process started is SIGKILLed at the end."""
    procs: list[subprocess.Popen] = []

    def start(run_dir: Path) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        procs.append(p)
        line = p.stdout.readline()
        assert line.strip() == "ready", p.stderr.read()
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait()


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _user_folder(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "thesis.tex").write_text("years of work")
    (d / "notes").mkdir(exist_ok=True)
    (d / "notes" / "a.txt").write_text("a")
    return d


def _legacy_run(d: Path) -> Path:
    """A run as written before the marker existed."""
    (d / "checkpoints" / "step-2").mkdir(parents=True)
    (d / "checkpoints" / "step-2" / "state.json").write_text("{}")
    (d / "samples").mkdir()
    (d / "samples" / "after.png").write_text("png")
    (d / "config.yaml").write_text("run: {}\n")
    (d / "metrics.jsonl").write_text("{}\n")
    return d


def _marked_run(d: Path) -> Path:
    prepare_run_dir(d, resume=False, overwrite=False)
    (d / "metrics.jsonl").write_text("{}\n")
    (d / "samples").mkdir()
    (d / "samples" / "after.png").write_text("png")
    return d


def _refused(d: Path, *words: str) -> None:
    """--overwrite of ``d`` is refused by both entry points, naming ``words``, and nothing in ``d`` changes."""
    before = _snapshot(d)
    for call in (check_run_dir, prepare_run_dir):
        with pytest.raises(RunDirError) as e:
            call(d, False, True)
        msg = str(e.value)
        assert "\n" not in msg and isinstance(e.value, UserError)
        for w in words:
            assert w in msg, msg
    assert _snapshot(d) == before


# ---------------------------------------------------------------------------------------------- --overwrite refusals
@pytest.mark.parametrize("kind", ["plain", "run"])
def test_overwrite_of_current_directory_is_refused(tmp_path, monkeypatch, kind):
    here = _user_folder(tmp_path / "here") if kind == "plain" else _legacy_run(tmp_path / "here")
    monkeypatch.chdir(here)
    _refused(Path("."), "it is the current directory")
    _refused(here, "it is the current directory")
    assert here.is_dir() and Path.cwd() == here.resolve()


def test_overwrite_of_a_parent_of_cwd_is_refused(tmp_path, monkeypatch):
    run = _legacy_run(tmp_path / "run")
    monkeypatch.chdir(run / "samples")
    _refused(Path(".."), "parent of the current directory")
    _refused(run, "parent of the current directory")


def test_overwrite_of_home_and_root_is_refused(tmp_path, monkeypatch):
    home = _legacy_run(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    _refused(home, "home directory")
    with pytest.raises(RunDirError, match="filesystem root"):  # check only: it never deletes anything
        check_run_dir(Path(Path.cwd().anchor), False, True)


def test_overwrite_of_a_plain_folder_with_user_files_is_refused(tmp_path):
    d = _user_folder(tmp_path / "mine")
    _refused(d, "not a directalign run directory", "delete this one yourself")
    # half a run's signature is not a run either
    (d / "config.yaml").write_text("x: 1\n")
    _refused(d, "not a directalign run directory")
    assert not (d / MARKER).exists() and not (d / LOCK_FILE).exists()


def test_overwrite_of_a_folder_holding_runs_is_refused(tmp_path):
    runs = tmp_path / "runs"
    _marked_run(runs / "a")
    _legacy_run(runs / "b")
    _refused(runs, "not a directalign run directory")
    # a folder that looks like a run itself but holds other runs is refused too, naming them
    (runs / "config.yaml").write_text("run: {}\n")
    (runs / "metrics.jsonl").write_text("{}\n")
    _refused(runs, "holds other runs", "a", "b")
    assert is_run_dir(runs / "a") and is_run_dir(runs / "b")


# ---------------------------------------------------------------------------------------------- --overwrite replaces
def test_overwrite_replaces_a_marked_run(tmp_path):
    run = _marked_run(tmp_path / "run")
    first = json.loads((run / MARKER).read_text())
    assert first["directalign"] == __version__ and "created" in first
    assert check_run_dir(run, False, True) is True
    assert prepare_run_dir(run, False, True) == run
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, LOCK_FILE])
    assert json.loads((run / MARKER).read_text())["created"] >= first["created"]
    assert lock_holder(run) is None  # the temporary lock was dropped


def test_overwrite_replaces_an_unmarked_legacy_run(tmp_path):
    run = _legacy_run(tmp_path / "run")
    prepare_run_dir(str(run), False, True)
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, LOCK_FILE])


def test_overwrite_of_a_symlink_to_a_run_replaces_the_run(tmp_path):
    run = _legacy_run(tmp_path / "run")
    link = tmp_path / "link"
    link.symlink_to(run)
    prepare_run_dir(link, False, True)
    assert link.is_symlink() and not (run / "config.yaml").exists() and (run / MARKER).is_file()


# ---------------------------------------------------------------------------------------------- today's contract
def test_flag_messages_and_check_touches_nothing(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(RunDirError, match="is a file; choose a directory"):
        check_run_dir(afile, False, False)
    with pytest.raises(RunDirError, match="cannot write to run directory .* choose a writable"):
        prepare_run_dir(afile / "run", False, False)
    with pytest.raises(RunDirError, match="--resume and --overwrite contradict"):
        check_run_dir(tmp_path / "x", True, True)
    with pytest.raises(RunDirError, match="does not exist or is empty; start without --resume"):
        check_run_dir(tmp_path / "nothing", True, False)
    run = _legacy_run(tmp_path / "run")
    before = _snapshot(run)
    with pytest.raises(RunDirError, match="already exists; pass --resume"):
        prepare_run_dir(run, False, False)
    assert check_run_dir(run, True, False) is True and check_run_dir(tmp_path / "new", False, False) is False
    assert _snapshot(run) == before and not (tmp_path / "new").exists()


def test_new_run_is_marked_and_marker_alone_counts_as_empty(tmp_path):
    run = prepare_run_dir(tmp_path / "a" / "run", False, False)
    assert is_run_dir(run) and (run / MARKER).is_file()
    # a run that died before writing anything can be started again without flags, but not resumed
    assert check_run_dir(run, False, False) is False
    with pytest.raises(RunDirError, match="does not exist or is empty"):
        check_run_dir(run, True, False)
    # an empty plain folder is a fine new run directory, with or without --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_run_dir(empty, False, True) == empty and is_run_dir(empty)


def test_resume_marks_a_legacy_run_but_not_a_foreign_folder(tmp_path):
    run = _legacy_run(tmp_path / "run")
    prepare_run_dir(run, True, False)
    assert (run / MARKER).is_file() and (run / "metrics.jsonl").read_text() == "{}\n"
    foreign = _user_folder(tmp_path / "mine")
    prepare_run_dir(foreign, True, False)  # the trainer refuses it later (no checkpoint); it must not become a run
    assert not (foreign / MARKER).exists() and not is_run_dir(foreign)


# ---------------------------------------------------------------------------------------------- the lock
def test_second_process_cannot_take_the_lock_and_is_told_the_pid(tmp_path, holder):
    run = tmp_path / "run"
    p = holder(run)
    with pytest.raises(RunDirError, match=rf"in use by another directalign process \(PID {p.pid}\)"):
        RunDirLock(run).acquire()
    assert lock_holder(run) == f"PID {p.pid}"
    for resume in (False, True):  # neither a fresh start nor a resume may share the directory
        with pytest.raises(RunDirError, match=f"PID {p.pid}"):
            check_run_dir(run, resume, False)


def test_lock_of_a_sigkilled_process_is_free_again(tmp_path, holder):
    run = tmp_path / "run"
    p = holder(run)
    p.kill()
    p.wait()
    assert (run / LOCK_FILE).exists() and lock_holder(run) is None
    with RunDirLock(run) as lock:
        assert lock.held and json.loads((run / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not lock.held and lock_holder(run) is None


def test_a_locked_run_cannot_be_overwritten(tmp_path, holder):
    run = _marked_run(tmp_path / "run")
    p = holder(run)
    _refused(run, f"PID {p.pid}", "wait for it to finish")


def test_lock_in_one_process_explicit_acquire_release(tmp_path):
    run = tmp_path / "run"
    lock = RunDirLock(run)
    assert lock.acquire() is lock and lock.acquire() is lock  # idempotent on the same object
    with pytest.raises(RunDirError, match=f"PID {os.getpid()}"):  # another lock object conflicts, even here
        RunDirLock(run).acquire()
    lock.release()
    lock.release()
    with RunDirLock(run):
        pass


def test_the_lock_is_held_without_a_gap_through_an_overwrite(tmp_path):
    """prepare_run_dir(lock=...) empties the run around its lock file instead of deleting the directory, so the
    lock keeps its inode: a process that opened the file before still contends for the same lock."""
    run = _marked_run(tmp_path / "run")
    lock = RunDirLock(run)
    lock.acquire()
    inode = (run / LOCK_FILE).stat().st_ino
    lock.release()
    try:
        assert prepare_run_dir(run, False, True, lock=lock) == run
        assert lock.held and (run / LOCK_FILE).stat().st_ino == inode
        probe = subprocess.run([sys.executable, "-c", _HOLDER, str(run)], capture_output=True, text=True,
                               timeout=120)
        assert probe.returncode != 0 and f"PID {os.getpid()}" in probe.stderr
        with pytest.raises(RunDirError, match=f"PID {os.getpid()}"):
            prepare_run_dir(run, False, True)
    finally:
        lock.release()
    with pytest.raises(ValueError, match="lock is for"):
        prepare_run_dir(run, False, True, lock=RunDirLock(tmp_path / "other"))
