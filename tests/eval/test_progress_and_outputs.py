"""Issue 16, items 12, 13 and 15 for ``sample | eval | compare`` and the held-out evaluation inside ``train``:

* a progress bar (tqdm: ``%|`` and a rate) on stderr for generation and scoring, hidden by ``--no-progress`` /
  ``run.progress=false``; an error raised while a bar is shown still gets a line of its own;
* without ``--out`` nothing lands in the current directory itself: a new ``outputs/<command>-...`` folder, printed;
* ``compare`` names its positional arguments ``MODEL`` (not ``--model``) in its help and its errors.
"""

from __future__ import annotations

import pytest
import torch

from directalign.eval import EvalError

FAST = ["--steps", "1", "--seeds", "0", "--prompts", "{prompts}"]


def _prompts(tmp_path, n: int = 2):
    path = tmp_path / "prompts.txt"
    path.write_text("".join(f"a red circle on a blue background {i}\n" for i in range(n)), encoding="utf-8")
    return path


def _fast(tmp_path) -> list[str]:
    return [a.format(prompts=_prompts(tmp_path)) for a in FAST]


def _has_bar(err: str) -> bool:
    return "%|" in err and ("/s" in err or "s/" in err)  # tqdm's bar and its rate (img/s or s/img)


def _only_outputs(cwd) -> list:
    """What the command created in the current directory, besides the prompts file of the test."""
    return sorted(p.name for p in cwd.iterdir() if p.name != "prompts.txt")


def test_sample_bar_and_default_output_folder(random_world, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["sample", "--model", "tiny-world", *_fast(tmp_path)])
    assert code == 0, err
    assert _has_bar(err) and "tiny-world: sampling" in err
    assert _only_outputs(tmp_path) == ["outputs"]
    (folder,) = (tmp_path / "outputs").iterdir()
    assert folder.name.startswith("sample-tiny-world-")
    assert (folder / "manifest.jsonl").is_file() and (folder / "00000.png").is_file()
    assert f"to {folder.relative_to(tmp_path)}" in out  # where it wrote
    # a second run gets its own folder; --no-progress shows no bar
    code, out, err = cli(["sample", "--model", "tiny-world", *_fast(tmp_path), "--no-progress"])
    assert code == 0 and err == ""
    assert len(list((tmp_path / "outputs").iterdir())) == 2


def test_eval_bar_default_output_folder_and_no_progress(random_world, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["eval", "--model", "tiny-world", *_fast(tmp_path), "--no-images"])
    assert code == 0, err
    assert _has_bar(err) and "tiny-world: generating" in err and "scoring" in err
    assert _only_outputs(tmp_path) == ["outputs"]
    (folder,) = (tmp_path / "outputs").iterdir()
    assert folder.name.startswith("eval-tiny-world-") and (folder / "aggregate.json").is_file()
    assert str(folder.relative_to(tmp_path) / "aggregate.json") in out
    code, _, err = cli(["eval", "--model", "tiny-world", *_fast(tmp_path), "--no-images", "--no-progress",
                        "--out", tmp_path / "quiet"])
    assert code == 0 and err == ""


def test_compare_bar_default_output_folder(random_world, tmp_path, monkeypatch, cli):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["compare", "tiny-world", "base", *_fast(tmp_path)])
    assert code == 0, err
    assert _has_bar(err) and "base: generating" in err
    (folder,) = (tmp_path / "outputs").iterdir()
    assert folder.name.startswith("compare-") and (folder / "compare.json").is_file()
    assert _only_outputs(tmp_path) == ["outputs"]
    assert str(folder.relative_to(tmp_path) / "compare.json") in out


def test_compare_names_its_positional_arguments(random_world, tmp_path, cli, capsys):
    with pytest.raises(SystemExit):
        cli(["compare", "--help"])
    usage = capsys.readouterr().out
    assert "MODEL [MODEL ...]" in usage and "models [models ...]" not in usage
    positional = usage.split("positional arguments:")[1].split("options:")[0]
    assert positional.split()[0] == "MODEL" and "--model" not in positional
    code, _, err = cli(["compare", "tiny-world", tmp_path / "no-such-run", "--out", tmp_path / "c"])
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "compare MODEL" in err and "--model" not in err and "no-such-run" in err
    assert "an eval output directory" in err  # compare takes those too
    code, _, err = cli(["compare", "tiny-world"])
    assert code == 2 and "at least two MODEL arguments" in err
    assert not (tmp_path / "c").exists()


def test_an_error_during_a_bar_starts_its_own_line(random_world, tmp_path, monkeypatch, cli):
    from directalign.methods import sampling

    real, calls = sampling.rollout, []

    def fail_on_the_second_batch(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise EvalError("the second batch failed; fix it")
        return real(*a, **k)

    monkeypatch.setattr(sampling, "rollout", fail_on_the_second_batch)
    code, _, err = cli(["sample", "--model", "tiny-world", *_fast(tmp_path), "--batch-size", "1",
                        "--out", tmp_path / "s"])
    assert code == 2
    *bar_lines, last = err.rstrip("\n").split("\n")
    assert bar_lines and "%|" in bar_lines[-1]  # the bar was shown, and closed with a line end
    assert last == "directalign: error: the second batch failed; fix it"
    assert not (tmp_path / "s").exists()  # nothing written when the work fails


def test_heldout_evaluation_and_best_of_n_show_bars_unless_run_progress_is_false(random_world, capsys):
    from helpers import build_parts, tiny_config

    from directalign.eval.heldout import best_of_n, evaluate
    from directalign.methods.sampling import generate

    prompts = ["a red circle on a blue background", "a green square on a yellow background"]
    cfg = tiny_config("srpo", "run.progress=true", "eval.seeds=[0,1]", "eval.steps=2", "eval.batch_size=3")
    adapter, reward, _, _ = build_parts(cfg, finetune=False)
    capsys.readouterr()
    result = evaluate(adapter, reward, cfg, prompts, True)
    assert best_of_n(adapter, reward, cfg, prompts, 2) >= result.reward - 1e-6
    err = capsys.readouterr().err
    # one tick per sampling step: 4 images in batches of 3 -> 2 batches x 2 steps; best-of-2 twice that
    assert _has_bar(err) and "held-out eval" in err and "best-of-2" in err and "4/4" in err and "8/8" in err
    # counting the steps changes nothing: the same images as generate's own
    e = cfg.eval
    whole = generate(adapter, result.prompts, result.seeds, e.steps, cfg.sampling.shift, e.guidance,
                     cfg.model.height, cfg.model.width, e.batch_size)
    assert torch.equal(result.images, whole)
    cfg.run.progress = False
    evaluate(adapter, reward, cfg, prompts[:1], True)
    best_of_n(adapter, reward, cfg, prompts[:1], 2)
    assert capsys.readouterr().err == ""


def test_default_output_folders_are_git_ignored():
    from helpers import REPO

    assert "outputs/" in (REPO / ".gitignore").read_text(encoding="utf-8").splitlines()
