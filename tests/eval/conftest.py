"""What the tests of ``directalign sample | eval | compare | report`` share: a finished 2-step run on the
random-weight tiny world, and a way to call the command line."""

import pytest

from directalign.cli import main

RUN_SETTINGS = ["train.steps=2", "train.batch_size=2", "srpo.rollout_steps=2", "eval.seeds=[0]", "eval.steps=2",
                "eval.best_of=1", "run.progress=false", "train.learning_rate=1e-2"]


@pytest.fixture(scope="session")
def tiny_run(random_world_dir, tmp_path_factory):
    """A finished 2-step SRPO + LoRA run on the random world (learning rate high enough to move the reward)."""
    from directalign.config import build_config
    from directalign.training import train

    out = tmp_path_factory.mktemp("eval-run") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIRECTALIGN_WORLD_DIR", str(random_world_dir))
        mp.setenv("HF_HUB_OFFLINE", "1")
        cfg = build_config({}, [f"run.output_dir={out}", *RUN_SETTINGS])
        train(cfg, log=lambda *_: None)
    return out


@pytest.fixture
def cli(capsys):
    """``cli(argv)`` runs ``directalign`` in-process and returns (exit status, stdout, stderr)."""

    def run(argv):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
