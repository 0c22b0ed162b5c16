"""Issue 16, items 13 and 15 for ``directalign world gates | demo | build`` (on the shipped world, whose pipeline
samples as diffusers does): progress bars on stderr (hidden by
``--no-progress``), and default outputs under ``outputs/`` so that ``world gates`` run from the repository root
leaves the tracked ``docs/tiny-world-gates.json`` alone unless ``--out`` names it."""

from __future__ import annotations

import json

import pytest
import torch

from directalign.world import build, demo, gates
from directalign.world.build_progress import SECONDS_PER_STEP, BuildProgress


@pytest.fixture(autouse=True)
def quiet():
    """No diffusers / transformers loading bars, as under the ``directalign`` command."""
    from directalign.compat import quiet_loading

    quiet_loading()


@pytest.fixture
def keep_threads():
    """The world tools set torch's thread count; give the next tests the one they had."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _has_bar(err: str) -> bool:
    return "%|" in err


def test_gates_leave_the_tracked_gates_file_alone_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # as if run from the repository root
    tracked = tmp_path / "docs" / "tiny-world-gates.json"
    tracked.parent.mkdir()
    tracked.write_text('{"the": "committed gates"}')
    fake = {k: 1.0 for k in gates.THRESHOLDS} | {"passed": {k: True for k in gates.THRESHOLDS}}
    monkeypatch.setattr(gates, "measure", lambda n, progress=True: dict(fake))
    gates.main([])
    out = capsys.readouterr().out
    assert tracked.read_text() == '{"the": "committed gates"}'
    (written,) = (tmp_path / "outputs").glob("world-gates-*/tiny-world-gates.json")
    assert json.loads(written.read_text())["reward_top1"] == 1.0
    assert f"wrote {written.relative_to(tmp_path)}" in out
    gates.main(["--out", "docs/tiny-world-gates.json"])  # asked for: replaced
    assert json.loads(tracked.read_text())["reward_top1"] == 1.0


def test_gates_show_one_overall_bar_unless_no_progress(monkeypatch, capsys, keep_threads):
    # a few images per gate (the bar's span follows the module's counts), and a stand-in for the sampler (slow on a
    # busy CPU; what it draws does not matter here): the real reward scores and judges its images
    monkeypatch.setattr(gates, "TIMING_IMAGES", 2)
    monkeypatch.setattr(gates, "TIMING_REPEATS", 1)
    monkeypatch.setattr(gates, "WARM_UP_IMAGES", 1)
    monkeypatch.setattr(gates, "load_pipeline", lambda: None)
    monkeypatch.setattr(gates, "sample", lambda pipe, prompts, *a, **k: torch.rand(len(prompts), 3, 32, 32))
    result = gates.measure(4)
    err = capsys.readouterr().err
    assert _has_bar(err) and "world gates" in err and "11/11" in err  # 4 retrieval + 4 generated + 1 + 2 timed
    assert set(gates.THRESHOLDS) <= set(result)
    gates.measure(4, progress=False)
    assert capsys.readouterr().err == ""


def test_demo_writes_under_outputs_with_a_bar(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    demo.main(["--prompts", "1", "--seeds", "1"])
    out, err = capsys.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    (png,) = (tmp_path / "outputs").glob("world-demo-*/tiny-world-demo.png")
    assert f"wrote {png.relative_to(tmp_path)}" in out
    assert _has_bar(err) and "world demo" in err and "18/18" in err  # loading, 16 sampling steps, scoring
    monkeypatch.setattr(demo, "sample", lambda pipe, prompts, *a, **k: torch.rand(len(prompts), 3, 32, 32))
    demo.main(["--prompts", "1", "--seeds", "1", "--no-progress", "--out", str(tmp_path / "d.png")])
    assert capsys.readouterr().err == "" and (tmp_path / "d.png").is_file()


class _Saved:
    def save_pretrained(self, path):
        path.mkdir(parents=True, exist_ok=True)
        (path / "fake").write_text("x")


def test_build_shows_one_overall_bar_and_keeps_the_stage_lines(tmp_path, monkeypatch, capsys, keep_threads):
    from directalign.world.build_common import _log

    def fake_reward(steps, batch, seed):
        for step in range(steps):
            _log("reward", step=step, loss=1.0)
        return _Saved(), _Saved()

    monkeypatch.setattr(build, "train_reward", fake_reward)
    args = ["--stages", "reward", "--no-parallel", "--reward-steps", "3"]
    build.LOG.clear()
    build.main(["--out", str(tmp_path / "a"), *args])
    out, err = capsys.readouterr()
    assert [line for line in out.splitlines() if line.startswith("[reward]")] == [
        f"[reward] step={k} loss=1" for k in range(3)]
    assert _has_bar(err) and "world build" in err and "100%" in err and "reward step 3/3" in err
    build.LOG.clear()
    build.main(["--out", str(tmp_path / "b"), *args, "--no-progress"])
    out, err = capsys.readouterr()
    assert err == "" and "[reward] step=2 loss=1" in out


def test_build_bar_spans_the_longer_of_the_chain_and_the_parallel_reward(capsys):
    steps = {"vae": 10, "generator": 100, "distill": 10, "reward": 1000}
    w = SECONDS_PER_STEP
    p = BuildProgress(steps, parallel_reward=True, enabled=False)
    assert p.bar.total == pytest.approx(10 * w["vae"] + max(100 * w["generator"] + 10 * w["distill"],
                                                            1000 * w["reward"]))
    p.line("[vae] step=9 loss=0.1")
    assert p.bar.n == pytest.approx(10 * w["vae"])
    p.line("[generator] step=49 loss=0.1")
    p.line("[reward] step=9 loss=0.1")  # behind the generator: the generator's position counts
    assert p.bar.n == pytest.approx(10 * w["vae"] + 50 * w["generator"])
    p.line("[reward] step=999 loss=0.1")
    assert p.bar.n == pytest.approx(p.bar.total)
    p.line("[generator-eval] step=100 fg=1.0")  # not a training step line: nothing moves
    serial = BuildProgress(steps, parallel_reward=False, enabled=False)
    assert serial.bar.total == pytest.approx(sum(w[s] * n for s, n in steps.items()))
    assert "[vae] step=9" in capsys.readouterr().out  # every line is still printed
