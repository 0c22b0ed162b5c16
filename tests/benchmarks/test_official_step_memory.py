"""benchmarks/official_step_memory.py on directalign's side (the official clone is not available here): the JSON
fields, RSS bookkeeping, and live tensor bytes per phase that add up step after step."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
NAMED = ["rollout", "branch1_forward", "branch1_backward", "branch2_forward", "branch2_backward", "optimizer"]
SMALL = ("srpo.rollout_steps=2", "model.max_sequence_length=32")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("official_step_memory_bench", BENCH / "official_step_memory.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def world(bench, tmp_path_factory):
    from directalign.compat import quiet_loading

    quiet_loading()
    return bench.prepare_world(tmp_path_factory.mktemp("flux-world"), ["a red circle on a blue background",
                                                                      "a green square on a yellow background"])


def test_world_holds_the_official_preprocessing_output(world):
    items = json.loads((world / "embeddings" / "videos2caption.json").read_text())
    assert [i["caption"] for i in items] == (world / "prompts.txt").read_text().split("\n")[:2]
    embeds = torch.load(world / "embeddings" / "prompt_embed" / items[0]["prompt_embed_path"], weights_only=True)
    assert embeds.shape[0] == 512  # the text length, as the official preprocessing pads it


def test_directalign_side_phases_add_up(bench, world):
    backward = torch.Tensor.backward
    r = bench.directalign_side(world, 2, True, True, precompute=True, overrides=SMALL)
    assert torch.Tensor.backward is backward  # the recorder's hooks are undone
    assert len(r["rss_after_mb"]) == len(r["rss_increment_mb"]) == len(r["live_phases"]) == 2
    assert r["rss_added_mb"] == pytest.approx(sum(r["rss_increment_mb"]))
    assert r["rss_peak_mb"] >= max(r["rss_after_mb"]) and r["rss_before_mb"] > 0
    for i, ph in enumerate(r["live_phases"]):
        assert set(NAMED) <= set(ph), ph.keys()
        for name in NAMED:
            assert ph[name]["peak"] >= ph[name]["end"], name
        assert ph["total"]["peak"] == max(v["peak"] for k, v in ph.items() if k != "total")
        assert ph["optimizer"]["end"] == ph["total"]["end"]  # the step's last phase sets the level it leaves
        # each backward frees its branch's graph and accumulates into the same gradients: both leave one level,
        # from which the second branch starts
        assert ph["branch2_backward"]["end"] == ph["branch1_backward"]["end"] <= ph["branch2_forward"]["peak"]
        assert ph["branch2_forward"]["end"] > ph["branch2_backward"]["end"]
        if i:  # the level after a step is the next one's base: the steps' ends add up to the live level
            assert ph["prompts"]["peak"] < 2 ** 20  # precomputed before step 1: later steps only read the cache
            assert r["live_after_bytes"][i] - r["live_after_bytes"][i - 1] == ph["total"]["end"]
    # the gradients (9 MB of full fine-tuning here) are freed with their step: what a step leaves is small
    assert r["live_phases"][-1]["total"]["end"] < 2 ** 20
    assert r["live_phases"][-1]["branch2_backward"]["end"] > 8 * 2 ** 20


def test_table_has_a_column_per_side(bench, world):
    r = bench.directalign_side(world, 1, True, True, precompute=False, overrides=SMALL)
    text = bench.table({"directalign": {"rss": r, "live": r}})
    assert "| directalign |" in text and "| branch2_backward |" in text
    prompts = r["live_phases"][0]["prompts"]
    assert prompts["peak"] > 4 * prompts["end"] > 0  # encoded in the step: the T5's activations beside the embedding


@pytest.mark.slow
def test_command_writes_json_and_table(bench, tmp_path):
    out = tmp_path / "osm.json"
    bench.main(["--steps", "1", "--repeats", "1", "--out", str(out)])
    doc = json.loads(out.read_text())
    assert doc["settings"]["text_tokens"] == 512 and doc["settings"]["rollout_steps"] == 25
    assert {"cpu_model", "cores", "torch_threads", "torch"} <= set(doc["machine"])
    side = doc["results"]["directalign"]
    assert len(side["rss"]["rss_after_mb"]) == 1 and side["live"]["live_phases"][0]["total"]["peak"] > 0
    assert "python benchmarks/official_step_memory.py" in out.with_suffix(".md").read_text()
