"""Kill harness: real ``directalign train`` processes on the random-weight tiny world, killed and resumed.

* SIGKILL at random moments (a seeded RNG), half of them aimed inside a checkpoint write (the
  ``DIRECTALIGN_TEST_SLOW_CHECKPOINT`` hook makes each write take long enough to land in), then a restart with
  ``--resume`` (or a fresh start when no checkpoint exists yet). After every kill: every ``step-*`` directory loads
  completely; the restart resumes from the newest of them; partial ``.tmp-*`` directories are never loaded and are
  gone after the next save; when a chain of sessions reaches the last step, its weights, EMA, optimizer state and
  state.json equal those of an uninterrupted run bit for bit.
* SIGINT and SIGTERM: the run finishes its step, writes a checkpoint of it and exits with 128 + the signal number;
  resuming then completes identically.

Every run trains 8 steps of ``train.steps=9`` (``--max-steps-this-session``), so no session runs the final
evaluation; all processes are single-threaded, so results are reproducible bit for bit. The processes run a copy of
the source tree taken when the module starts, so editing the package while the harness runs cannot change the
config fingerprint between sessions.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from directalign.engine import checkpoint as ckpt

SRC = Path(__file__).resolve().parents[2] / "src"
TARGET = 8
SETTINGS = ["train.steps=9", "train.batch_size=1", "srpo.rollout_steps=2", "srpo.grid_points=40",
            "srpo.window_margin=2", "eval.before=false", "run.checkpoint_every=1", "run.progress=false",
            "run.keep_checkpoints=2", "train.lora_rank=4", "train.lora_alpha=8", "train.learning_rate=1e-3",
            "train.grad_clip=1.0", "train.ema_decay=0.5"]
KILLS = 12
PAUSE = 0.25  # seconds the test hook sleeps after each file of a checkpoint
SESSION_TIMEOUT = 600
EXPECTED_FILES = set(ckpt.FILES) | {"ema.safetensors"}


_SNAPSHOT: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _source_snapshot(tmp_path_factory):
    dest = tmp_path_factory.mktemp("src-snapshot") / "src"
    shutil.copytree(SRC, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _SNAPSHOT["src"] = dest
    yield dest
    _SNAPSHOT.clear()


class Session:
    def __init__(self, run_dir: Path, world: Path, logs: Path, pause: float | None = None):
        root = run_dir / "checkpoints"
        latest = ckpt.latest_checkpoint(root)
        self.start_step = ckpt._step_of(latest) if latest else 0
        argv = [sys.executable, "-m", "directalign", "train"]
        for s in SETTINGS + [f"run.output_dir={run_dir}"]:
            argv += ["--set", s]
        argv += ["--max-steps-this-session", str(TARGET - self.start_step)]
        self.resumed = latest is not None
        if self.resumed:
            argv.append("--resume")
        elif run_dir.exists():
            argv.append("--overwrite")
        env = dict(os.environ, PYTHONPATH=str(_SNAPSHOT.get("src", SRC)), DIRECTALIGN_WORLD_DIR=str(world),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        env.pop(ckpt.SLOW_ENV, None)
        if pause:
            env[ckpt.SLOW_ENV] = str(pause)
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob("*.out")))
        self.out_path, self.err_path = logs / f"{n:03d}.out", logs / f"{n:03d}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=self._err, env=env, start_new_session=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float = SESSION_TIMEOUT) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"session timed out; see {self.out_path}") from None
        finally:
            self._out.close()
            self._err.close()
        return code

    def send(self, sig: int) -> None:
        if self.running():
            self.proc.send_signal(sig)

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()


def _complete_steps(run_dir: Path) -> list[int]:
    """Steps of the ``step-*`` directories, each checked to be complete and loadable (never a partial one)."""
    root = run_dir / "checkpoints"
    steps = []
    for p in sorted(root.glob("step-*")) if root.is_dir() else []:
        files = {f.name for f in p.iterdir()}
        assert files == EXPECTED_FILES, f"{p.name} is incomplete: {sorted(files)}"
        loaded = ckpt.load_checkpoint(p)
        assert loaded["state"]["step"] == int(p.name[5:])
        steps.append(loaded["state"]["step"])
    return steps


def _tmp_dirs(run_dir: Path) -> set[str]:
    root = run_dir / "checkpoints"
    return {p.name for p in root.glob(".tmp-*")} if root.is_dir() else set()


def _resumed_step(session: Session) -> int | None:
    m = re.search(r"resumed from (\S+) at step (\d+)", session.stdout)
    if not m:
        return None
    assert Path(m.group(1)).name == f"step-{int(m.group(2)):08d}", m.group(0)
    return int(m.group(2))


def _final_state(run_dir: Path) -> dict:
    d = run_dir / "checkpoints" / f"step-{TARGET:08d}"
    return {
        "trainable": load_file(str(d / "trainable.safetensors")),
        "ema": load_file(str(d / "ema.safetensors")),
        "optimizer": torch.load(d / "optimizer.pt", weights_only=True),
        "state": json.loads((d / "state.json").read_text()),
    }


def _assert_bit_identical(a: dict, b: dict, label: str) -> None:
    for part in ("trainable", "ema"):
        assert set(a[part]) == set(b[part])
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{label}: {part} {k} differs from the uninterrupted run"
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    for i, sa in oa["state"].items():
        for k, v in sa.items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][k])), f"{label}: optimizer {i}.{k}"
    assert a["state"] == b["state"], label


@pytest.fixture(scope="module")
def reference(random_world_dir, tmp_path_factory, _source_snapshot):
    """One uninterrupted run: its final checkpoint and its wall time."""
    base = tmp_path_factory.mktemp("kill-reference")
    s = Session(base / "run", random_world_dir, base / "logs")
    code = s.wait()
    assert code == 0, s.stderr
    assert s.stdout.strip().startswith(f"stopped at step {TARGET}"), s.stdout
    return {"state": _final_state(base / "run"), "seconds": time.monotonic() - s.t0}


def _kill_somewhere(s: Session, run_dir: Path, rng: random.Random, seconds: float) -> str:
    """SIGKILL ``s`` at a random moment (mode 'anytime') or inside a random checkpoint write (mode 'mid-write')."""
    mode = rng.choice(["anytime", "mid-write"])
    if mode == "anytime":
        deadline = s.t0 + rng.uniform(0.2, seconds)
        while s.running() and time.monotonic() < deadline:
            time.sleep(0.01)
    else:
        before, wanted, seen = _tmp_dirs(run_dir), rng.randint(1, 3), 0
        while s.running():
            now = {n for n in _tmp_dirs(run_dir) if n.startswith(".tmp-step-")} - before
            if now:
                seen += 1
                before |= now
                if seen == wanted:
                    time.sleep(rng.uniform(0, 5 * PAUSE))
                    break
            time.sleep(0.005)
    killed = s.running()
    if killed:
        s.proc.send_signal(signal.SIGKILL)
    code = s.wait()
    return f"{mode}:{'killed' if killed else f'exit {code}'}"


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_exactly(random_world_dir, tmp_path, reference):
    rng = random.Random(20250907)
    kills, mid_write, chains, history = 0, 0, 0, []
    while kills < KILLS:
        chains += 1
        run_dir = tmp_path / f"chain{chains}"
        logs = tmp_path / f"logs{chains}"
        newest = 0
        while True:
            leftovers = _tmp_dirs(run_dir)
            s = Session(run_dir, random_world_dir, logs, pause=PAUSE)
            assert s.start_step == newest
            if kills < KILLS:
                outcome = _kill_somewhere(s, run_dir, rng, reference["seconds"] * 1.5 + 5 * PAUSE * TARGET)
            else:
                outcome = f"finish:exit {s.wait()}"
            history.append((chains, s.start_step, outcome))
            if "killed" in outcome:
                kills += 1
                if any(n.startswith(".tmp-step-") for n in _tmp_dirs(run_dir) - leftovers):
                    mid_write += 1
            else:
                assert outcome.endswith("exit 0"), (outcome, s.stderr)
            resumed_at = _resumed_step(s)
            if s.resumed and "killed" not in outcome:
                assert resumed_at is not None, s.stdout
            if resumed_at is not None:
                assert resumed_at == s.start_step, (s.stdout, history)
            steps = _complete_steps(run_dir)
            latest = max(steps, default=0)
            assert latest >= newest, f"a complete checkpoint was lost: {history}"
            if latest > newest:  # this session completed a save, which removes what earlier kills left behind
                assert not (leftovers & _tmp_dirs(run_dir)), f"partial directories survived a save: {history}"
            newest = latest
            if latest == TARGET:
                break
        _assert_bit_identical(_final_state(run_dir), reference["state"], f"chain {chains} {history}")
    print(f"{kills} kills ({mid_write} inside a checkpoint write) over {chains} runs: {history}")
    assert kills >= 10
    assert mid_write >= 3, f"too few kills landed inside a checkpoint write: {history}"


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_and_sigterm_stop_after_a_checkpoint(random_world_dir, tmp_path, reference, sig):
    run_dir, logs = tmp_path / "run", tmp_path / "logs"
    # SIGTERM is sent while a checkpoint is being written (the handler must not write a second one over it)
    s = Session(run_dir, random_world_dir, logs, pause=PAUSE if sig == signal.SIGTERM else None)
    while s.running():
        if sig == signal.SIGINT and (run_dir / "checkpoints" / "step-00000002" / "state.json").is_file():
            break
        if sig == signal.SIGTERM and any(n.startswith(".tmp-step-00000003") for n in _tmp_dirs(run_dir)):
            break
        time.sleep(0.005)
    assert s.running(), "the run ended before the signal could be sent"
    s.send(sig)
    code = s.wait()
    assert code == 128 + sig, (code, s.stderr)
    m = re.search(rf"stopped by {sig.name} after step (\d+); checkpoint written", s.stderr)  # said once, on stderr
    assert m and "stopped by" not in s.stdout, (s.stdout, s.stderr)
    stopped_at = int(m.group(1))
    assert stopped_at >= (2 if sig == signal.SIGINT else 3)
    err = s.stderr.strip().splitlines()
    assert err and err[-1].startswith(f"directalign: stopped by {sig.name} after step {stopped_at}"), s.stderr
    assert "Traceback" not in s.stderr
    assert max(_complete_steps(run_dir)) == stopped_at, "the checkpoint of the current step is missing"
    assert not _tmp_dirs(run_dir)
    if stopped_at < TARGET:
        r = Session(run_dir, random_world_dir, logs)
        assert r.wait() == 0, r.stderr
        assert _resumed_step(r) == stopped_at
    _assert_bit_identical(_final_state(run_dir), reference["state"], sig.name)
