"""Steering (directalign.steer): best-of-N and zero-order noise search on the random-weight tiny world, checked
against plain sampling, hand-computed maxima and the closed forms of their costs."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from helpers import PROMPTS

from directalign.cli import main
from directalign.eval.models import load_model, resolve_model
from directalign.eval.settings import settings_config
from directalign.methods.sampling import generate
from directalign.steer import SteerError, SteerSettings
from directalign.steer.base import options_of
from directalign.steer.best_of_n import BestOfNOptions, candidate_seed
from directalign.steer.noise_search import NoiseSearchOptions, perturb
from directalign.steer.registry import STEERERS
from directalign.steer.run import steer_with

SEEDS = [3, 7]


@pytest.fixture
def world(random_world):
    """(adapter, cfg) of the random-weight tiny world with 2-step sampling."""
    ref = resolve_model("tiny-world")
    cfg, _ = settings_config(None, [ref], {"eval.steps": 2, "eval.seeds": SEEDS, "run.progress": False})
    return load_model(ref, cfg), cfg


class Brightness:
    """A cheap reward: the mean pixel value; counts the images it scores."""

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts):
        assert len(images) == len(prompts)
        self.calls += len(images)
        return images.mean(dim=(1, 2, 3))


def slots():
    return [p for p in PROMPTS for _ in SEEDS], [s for _ in PROMPTS for s in SEEDS]


def plain(adapter, cfg, prompts, seeds):
    e, m = cfg.eval, cfg.model
    return generate(adapter, prompts, seeds, e.steps, cfg.sampling.shift, e.guidance, m.height, m.width,
                    e.batch_size)


def test_best_of_one_is_plain_sampling_bit_for_bit(world):
    adapter, cfg = world
    prompts, seeds = slots()
    res = STEERERS["best-of-n"].run(adapter, Brightness(), prompts, seeds, SteerSettings.from_config(cfg, BestOfNOptions(n=1)))
    assert torch.equal(res.images, plain(adapter, cfg, prompts, seeds))
    assert [c["candidate"] for c in res.chosen] == [0] * len(prompts)
    assert [c["noise_seed"] for c in res.chosen] == seeds


def test_best_of_n_keeps_the_max_and_counts_its_costs(world):
    adapter, cfg = world
    prompts, seeds = slots()
    n, score, ticks = 3, Brightness(), []
    s = SteerSettings.from_config(cfg, BestOfNOptions(n), on_step=ticks.append)
    res = STEERERS["best-of-n"].run(adapter, score, prompts, seeds, s)
    # by hand: every candidate j is the plain sample of seed s + stride * j
    cands = [plain(adapter, cfg, prompts, [candidate_seed(x, j) for x in seeds]) for j in range(n)]
    r = torch.stack([c.mean(dim=(1, 2, 3)) for c in cands])  # (n, slots)
    best = r.argmax(0)
    assert torch.equal(res.rewards, r.max(0).values)
    for i, j in enumerate(best.tolist()):
        assert res.chosen[i] == {"candidate": j, "noise_seed": candidate_seed(seeds[i], j)}
        assert torch.equal(res.images[i], cands[j][i])
    steps, k = cfg.eval.steps, len(prompts)
    assert res.nfe_no_grad == steps * n * k == STEERERS["best-of-n"].nfe(k, s) == sum(ticks)
    assert res.nfe_grad == 0 and res.reward_calls == n * k == score.calls and res.seconds > 0


def test_steer_with_leaves_the_callers_settings_alone_and_ticks_its_bar(world, monkeypatch):
    adapter, cfg = world
    prompts, seeds = slots()
    ticks = []

    class Bar:  # stands in for the tqdm bar: records what the steerer reports
        def __init__(self, total, *a, **k):
            self.total = total

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, k):
            ticks.append(k)

    monkeypatch.setattr("directalign.progress.bar", Bar)
    s = SteerSettings.from_config(cfg, BestOfNOptions(2))
    before = dataclasses.replace(s)
    res = steer_with("best-of-n", adapter, Brightness(), "train", prompts, seeds, s, progress=False, label="t")
    assert s.on_step is None and s == before  # the caller's object is untouched (it may be reused for another run)
    assert sum(ticks) == res.nfe_no_grad == STEERERS["best-of-n"].nfe(len(prompts), s) > 0
    assert res.extra["reward_spec"] == "train" and res.extra["options"] == {"n": 2}


def test_perturbation_keeps_unit_variance():
    for lam in (0.1, 0.3, 0.5, 1.0):
        a, b = perturb(torch.ones(1), torch.zeros(1), lam).item(), perturb(torch.zeros(1), torch.ones(1), lam).item()
        assert a == pytest.approx(math.sqrt(1 - lam**2)) and b == pytest.approx(lam)
        assert a**2 + b**2 == pytest.approx(1.0)  # var(a eps + b z) for independent standard normals
    g = torch.Generator().manual_seed(0)
    x = perturb(torch.randn(200_000, generator=g), torch.randn(200_000, generator=g), 0.3)
    assert x.var().item() == pytest.approx(1.0, abs=0.02) and abs(x.mean().item()) < 0.01


def test_noise_search_never_worse_than_its_start_and_deterministic(world):
    adapter, cfg = world
    prompts, seeds = slots()
    n, rounds, nb = 2, 2, 2
    runs = []
    for _ in range(2):
        score, ticks = Brightness(), []
        s = SteerSettings.from_config(cfg, NoiseSearchOptions(n, rounds, nb, 0.5), on_step=ticks.append)
        runs.append(STEERERS["noise-search"].run(adapter, score, prompts, seeds, s))
        k = len(prompts)
        assert runs[-1].nfe_no_grad == cfg.eval.steps * (n + rounds * nb) * k == sum(ticks)
        assert runs[-1].reward_calls == (n + rounds * nb) * k == score.calls and runs[-1].nfe_grad == 0
    res = runs[0]
    start = STEERERS["best-of-n"].run(adapter, Brightness(), prompts, seeds, SteerSettings.from_config(cfg, BestOfNOptions(n)))
    assert res.extra["start_rewards"] == start.rewards.tolist()
    assert bool((res.rewards >= start.rewards).all())
    assert torch.equal(res.images, runs[1].images) and res.chosen == runs[1].chosen
    for c, c0 in zip(res.chosen, start.chosen):
        assert c["candidate"] == c0["candidate"] and 0 <= c["round"] <= rounds
    assert torch.allclose(res.rewards, res.images.mean(dim=(1, 2, 3)))  # the reward of the image returned


def test_bad_options_are_one_line_errors():
    for kw, word in [({"n": 0}, "--steer-n"), ({"rounds": -1}, "--steer-rounds"), ({"neighbors": 0}, "neighbors"),
                     ({"lam": 0.0}, "--steer-lambda"), ({"lam": 1.5}, "--steer-lambda")]:
        with pytest.raises(SteerError, match=word) as e:
            options_of(STEERERS["noise-search"], SteerSettings(2, 1.0, None, 8, 8, options=NoiseSearchOptions(**kw)))
        assert "\n" not in str(e.value)


def test_sample_steer_cli(random_world, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    base = ["sample", "--model", "tiny-world", "--prompts", str(tmp_path / "p.txt"), "--seeds", "0", "1", "--steps",
            "2", "--no-progress"]
    for name in ("a", "b"):
        assert main([*base, "--steer", "best-of-n", "--steer-n", "2", "--out", str(tmp_path / name)]) == 0
    doc = json.loads((tmp_path / "a" / "steer.json").read_text())
    assert doc["steer"] == "best-of-n" and doc["reward_spec"] == "train" and doc["images"] == 4
    assert doc["nfe_no_grad"] == 2 * 2 * 4 and doc["nfe_grad"] == 0 and doc["reward_calls"] == 2 * 4
    lines = [json.loads(x) for x in (tmp_path / "a" / "manifest.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in lines] == [r["reward"] for r in doc["per_image"]]
    assert all(r["steer"]["candidate"] in (0, 1) for r in lines)
    for rec in lines:  # same command, same images
        assert (tmp_path / "a" / rec["file"]).read_bytes() == (tmp_path / "b" / rec["file"]).read_bytes()
    assert main([*base, "--steer", "noise-search", "--steer-n", "1", "--steer-rounds", "1", "--steer-neighbors",
                 "2", "--steer-lambda", "0.3", "--steer-reward", "tiny-world", "--out", str(tmp_path / "c")]) == 0
    doc = json.loads((tmp_path / "c" / "steer.json").read_text())
    assert doc["nfe_no_grad"] == 2 * (1 + 1 * 2) * 4 and doc["reward_calls"] == (1 + 2) * 4
    assert doc["mean_reward"] >= doc["mean_start_reward"] and doc["options"]["lambda"] == 0.3
    capsys.readouterr()
    assert main([*base, "--steer-n", "2", "--out", str(tmp_path / "d")]) == 2
    assert main([*base, "--steer", "best-of-n", "--steer-rounds", "2", "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "needs --steer" in err[0] and "noise-search only" in err[1]
    assert not (tmp_path / "d").exists()


def test_sample_cli_runs_fk_reno_and_dno_with_the_training_reward(random_world, tmp_path, capsys):
    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    base = ["sample", "--model", "tiny-world", "--prompts", str(tmp_path / "p.txt"), "--seeds", "0", "1", "--steps",
            "3", "--no-progress"]
    runs = {"fk": ["--steer-n", "2", "--steer-lambda", "5", "--steer-potential", "add", "--steer-resample-start",
                   "0.3"],
            "reno": ["--steer-iterations", "1", "--steer-lr", "2.0", "--steer-reg", "0.0"],
            "dno": ["--steer-iterations", "1", "--steer-eta", "0.5", "--steer-permutations", "2"]}
    for name, flags in runs.items():
        assert main([*base, "--steer", name, *flags, "--out", str(tmp_path / name)]) == 0, name
        doc = json.loads((tmp_path / name / "steer.json").read_text())
        assert doc["steer"] == name and doc["reward_spec"] == "train" and doc["images"] == 2
        assert doc["nfe"] == doc["nfe_grad"] + doc["nfe_no_grad"]
    fk = json.loads((tmp_path / "fk" / "steer.json").read_text())
    assert fk["options"]["lambda"] == 5.0 and fk["options"]["potential"] == "add" and fk["nfe_no_grad"] == 3 * 2 * 2
    assert fk["resampling_steps"] == [1] and fk["reward_calls"] == 2 * 2 * 2
    for name in ("reno", "dno"):  # the held-out reward is differentiable: the noise moved and the best is kept
        doc = json.loads((tmp_path / name / "steer.json").read_text())
        assert doc["nfe_grad"] == 3 * 1 * 2 and doc["nfe_no_grad"] == 3 * 2 and doc["reward_calls"] == 2 * 2
        assert doc["mean_reward"] >= doc["mean_start_reward"]
    capsys.readouterr()
    bad = [(["--steer", "reno", "--steer-n", "2"], "--steer-n applies to --steer best-of-n / noise-search / fk only"),
           (["--steer", "fk", "--steer-potential", "min"], "--steer-potential"),
           (["--steer", "dno", "--steer-gamma", "-1"], "--steer-gamma must be >= 0"),
           (["--steer-iterations", "2"], "needs --steer")]
    for flags, message in bad:
        assert main([*base, *flags, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "bad").exists()


def test_python_entry_point_matches_the_command_line(random_world, tmp_path):
    import directalign as da

    (tmp_path / "p.txt").write_text(PROMPTS[0] + "\n")
    res = da.steered_sample("tiny-world", [PROMPTS[0]], method="best-of-n", seeds=[0, 1], options={"n": 2},
                   settings={"eval.steps": 2})
    assert main(["sample", "--model", "tiny-world", "--prompts", str(tmp_path / "p.txt"), "--seeds", "0", "1",
                 "--steps", "2", "--no-progress", "--steer", "best-of-n", "--steer-n", "2", "--out",
                 str(tmp_path / "cli")]) == 0
    doc = json.loads((tmp_path / "cli" / "steer.json").read_text())
    assert res.rewards.tolist() == pytest.approx([r["reward"] for r in doc["per_image"]], abs=1e-6)
    assert res.chosen == [r["steer"] for r in doc["per_image"]]
    assert res.extra["prompts"] == [PROMPTS[0]] * 2 and res.extra["seeds"] == [0, 1]
    assert res.costs()["nfe_no_grad"] == doc["nfe_no_grad"]
    with pytest.raises(SteerError, match="unknown steering method 'bon'"):
        da.steered_sample("tiny-world", [PROMPTS[0]], method="bon")
    with pytest.raises(SteerError, match="best-of-n has no option 'rounds'"):
        da.steered_sample("tiny-world", [PROMPTS[0]], options={"rounds": 2})


@pytest.mark.parametrize("method,options", [("noise-search", {"n": 1, "rounds": 1, "neighbors": 1}),
                                            ("fk", {"n": 2, "lambda": 5.0}), ("reno", {"iterations": 1}),
                                            ("dno", {"iterations": 1, "permutations": 2})])
def test_every_steerer_from_python_is_seeded_and_deterministic(random_world, method, options):
    import directalign as da

    runs = [da.steered_sample("tiny-world", [PROMPTS[0]], method=method, seeds=[0, 1], options=options,
                              settings={"eval.steps": 3}) for _ in range(2)]
    assert torch.equal(runs[0].images, runs[1].images) and runs[0].chosen == runs[1].chosen
    assert runs[0].images.shape[0] == 2 and runs[0].extra["options"]
    other = da.steered_sample("tiny-world", [PROMPTS[0]], method=method, seeds=[5, 1], options=options,
                              settings={"eval.steps": 3})
    assert not torch.equal(other.images[0], runs[0].images[0])  # another seed, another image
    assert torch.allclose(other.images[1], runs[0].images[1], atol=1e-6)  # a slot depends on its own seed only
