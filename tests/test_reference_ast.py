"""``tools/reference_ast.py``: the statements the golden-data tools take out of flow_grpo's training scripts, and the
loud failure on any other layout."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import reference_ast  # noqa: E402

SCRIPT = '''
def get_sigmas(t, n_dim=4):
    return t / 1000

def main():
    for batch in loader:
        with accelerator.accumulate(transformer):
            x = batch["latents"]
            loss = (x * 2).mean()
            info["loss"].append(loss)
            accelerator.backward(loss)
            optimizer.step()
'''


def test_function_and_statements_before_the_backward():
    assert reference_ast.function_source(SCRIPT, "get_sigmas", "s.py") == (
        "def get_sigmas(t, n_dim=4):\n    return t / 1000")
    body = reference_ast.accumulate_body(SCRIPT, "s.py")
    assert len(body) == 5  # the whole block, backward and optimizer step included
    assert reference_ast.before_backward(body, "s.py") == (
        "x = batch['latents']\nloss = (x * 2).mean()\ninfo['loss'].append(loss)")


def test_other_layouts_fail_with_the_file_named():
    with pytest.raises(SystemExit, match="s.py defines no function compute_log_prob"):
        reference_ast.function_source(SCRIPT, "compute_log_prob", "s.py")
    twice = SCRIPT + SCRIPT.replace("def get_sigmas", "def other").replace("def main", "def main2")
    with pytest.raises(SystemExit, match="expected one accumulate block in s.py, found 2"):
        reference_ast.accumulate_body(twice, "s.py")
    body = reference_ast.accumulate_body(SCRIPT.replace("accelerator.backward(loss)", "loss.backward()"), "s.py")
    with pytest.raises(SystemExit, match="the accumulate block of s.py never calls accelerator.backward"):
        reference_ast.before_backward(body, "s.py")
