"""The run-directory rules end to end, through ``directalign train``: ``--overwrite`` of a directory that is not a
run (the current directory) is refused with one line and nothing lost, and a second run into a directory a live run
holds is refused naming the holder's PID (issue: --overwrite deleted the current directory; two runs clobbered each
other)."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
import time

from helpers import SRC

# The slow tier: each test starts `directalign train` processes.
pytestmark = pytest.mark.slow

CHEAP = ["--set", "srpo.rollout_steps=2", "--set", "srpo.grid_points=40", "--set", "srpo.window_margin=2",
         "--set", "eval.before=false", "--set", "run.progress=false", "--set", "train.batch_size=1",
         "--set", "run.report=false", "--set", "eval.seeds=[0]", "--set", "eval.steps=2", "--set", "eval.best_of=1"]


def _env(world) -> dict:
    return dict(os.environ, DIRECTALIGN_WORLD_DIR=str(world), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")


def _train(args, cwd, world, timeout=300):
    return subprocess.run([sys.executable, "-m", "directalign", "train", *CHEAP, *args], cwd=cwd, env=_env(world),
                          capture_output=True, text=True, timeout=timeout)


def test_overwrite_of_the_current_directory_is_refused_and_nothing_is_lost(random_world_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    (work / "data").mkdir()
    (work / "data" / "a.png").write_bytes(b"x")
    out = _train(["--set", "run.output_dir=.", "--overwrite"], work, random_world_dir)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "refuses" in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert (work / "notes.txt").read_text() == "mine" and (work / "data" / "a.png").read_bytes() == b"x"


def test_a_second_run_into_a_live_runs_directory_is_refused_naming_its_pid(random_world_dir, tmp_path):
    run = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "directalign", "train", *CHEAP, "--set", "train.steps=100000",
                              "--set", f"run.output_dir={run}"], cwd=tmp_path, env=_env(random_world_dir),
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run / "config.yaml").is_file():  # written once the first run holds the lock and set up
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline, "the first run did not start"
            time.sleep(0.2)
        for flags in ([], ["--overwrite"], ["--resume"]):
            out = _train(["--set", f"run.output_dir={run}", "--set", "train.steps=1", *flags], tmp_path,
                         random_world_dir)
            assert out.returncode == 2, (flags, out.stderr)
            lines = out.stderr.strip().splitlines()
            assert len(lines) == 1 and f"PID {first.pid}" in lines[0], (flags, out.stderr)
        assert first.poll() is None, "the first run was disturbed"
        assert (run / "config.yaml").is_file()
    finally:
        first.kill()
        first.wait()
