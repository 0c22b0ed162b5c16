"""Stopping a run with SIGINT prints one message, on a line of its own after the progress bar (issue 16 item 13)."""

from __future__ import annotations

import os
import re
import signal

from helpers import CHEAP, COMMON

from directalign.cli import main


def test_sigint_prints_one_message_after_the_progress_bar(random_world, tmp_path, monkeypatch, capsys):
    from directalign.methods import srpo as srpo_mod

    real = srpo_mod.SRPO.train_step

    def interrupted(self, ctx, backward):
        if ctx.step == 0:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C does: the loop's handler lets the step finish
        return real(self, ctx, backward)

    monkeypatch.setattr(srpo_mod.SRPO, "train_step", interrupted)
    run = tmp_path / "run"
    argv = ["train"]
    for s in COMMON + CHEAP["srpo"] + [f"run.output_dir={run}", "train.steps=3", "run.progress=true"]:
        argv += ["--set", s]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 128 + signal.SIGINT, (code, out, err)
    assert (run / "checkpoints" / "step-00000001" / "state.json").is_file()
    assert (out + err).count("stopped by SIGINT") == 1, (out, err)
    # the bar (tqdm, on stderr) is closed first, so the message starts its own line
    assert re.search(r"(^|\n)directalign: stopped by SIGINT after step 1; checkpoint written", err), err
    assert "Traceback" not in err
