"""SRPO's default control words depend on the reward kind (``directalign.rewards.control_words``), and the shipped
FLUX.1-dev + HPSv3 configuration loads, validates and keeps the official recipe outside its reward section."""

from __future__ import annotations

import pytest
import yaml

from directalign.config import build_config, load_config, packaged_config
from directalign.engine.config import RewardConfig
from directalign.rewards import relative
from directalign.rewards.control_words import (
    DEFAULT_CONTROL_WORDS,
    IMAGE_ONLY,
    default_control_words,
)
from directalign.rewards.registry import REWARD_KINDS, reward_needs


def test_every_kind_has_an_entry_and_hps_has_the_official_lists():
    assert set(DEFAULT_CONTROL_WORDS) == set(REWARD_KINDS) - {"sum"}
    assert DEFAULT_CONTROL_WORDS["hpsv2"] == (relative.HPS_POSITIVE_WORDS, relative.HPS_NEGATIVE_WORDS)
    assert DEFAULT_CONTROL_WORDS["tiny-world"] == (relative.TINY_POSITIVE_WORDS, relative.TINY_NEGATIVE_WORDS)
    assert all(pos and neg and not set(pos) & set(neg) for pos, neg in DEFAULT_CONTROL_WORDS.values())
    assert DEFAULT_CONTROL_WORDS["hpsv3"] != DEFAULT_CONTROL_WORDS["hpsv2"] != DEFAULT_CONTROL_WORDS["mps"]


@pytest.mark.parametrize("kind", sorted(DEFAULT_CONTROL_WORDS))
def test_unset_words_take_the_kinds_defaults(kind):
    cfg = build_config({}, [f"reward.kind={kind}", *(["reward.form=absolute"] if kind in IMAGE_ONLY else [])])
    assert (tuple(cfg.reward.positive_words), tuple(cfg.reward.negative_words)) == DEFAULT_CONTROL_WORDS[kind]
    again = build_config(yaml.safe_load(cfg.to_yaml()))  # the resolved config.yaml records the words it used
    assert again == cfg and again.reward.positive_words == cfg.reward.positive_words


def test_set_words_win_and_an_empty_list_is_still_an_error():
    cfg = build_config({}, ["reward.kind=hpsv3", "reward.positive_words=[Real]"])
    assert cfg.reward.positive_words == ["Real"]
    assert cfg.reward.negative_words == list(DEFAULT_CONTROL_WORDS["hpsv3"][1])
    with pytest.raises(ValueError, match="reward.positive_words"):
        build_config({}, ["reward.kind=hpsv3", "reward.positive_words=[]"])


def test_sum_takes_its_first_text_conditioned_term():
    cfg = build_config({}, ["reward.kind=sum", "reward.terms.kinds=[aesthetic, mps, hpsv2]",
                            "reward.terms.paths=[a, b, c]"])
    assert tuple(cfg.reward.positive_words) == DEFAULT_CONTROL_WORDS["mps"][0]
    assert default_control_words("sum", ["aesthetic"]) == default_control_words("hpsv2")
    assert RewardConfig().positive_words == ["textured"]  # the default kind, tiny-world


def test_flux_dev_srpo_hpsv3_config():
    cfg = load_config(packaged_config("flux-dev-srpo-hpsv3"))
    assert cfg.method == "srpo" and cfg.reward.kind == "hpsv3" and cfg.reward.form == "official"
    assert tuple(cfg.reward.positive_words) == DEFAULT_CONTROL_WORDS["hpsv3"][0]
    needs = {n.key: (n.value, n.role) for n in reward_needs(cfg.reward)}
    assert needs == {"reward.path": ("./data/hpsv3/HPSv3.safetensors", "file"),
                     "reward.tokenizer": ("Qwen/Qwen2-VL-7B-Instruct", "tokenizer")}
    ours, recipe = cfg.to_dict(), load_config(packaged_config("flux-dev-srpo-hpsv2")).to_dict()
    for section in ours:
        if section not in ("reward", "run"):
            assert ours[section] == recipe[section], section  # the official HPSv2.1 recipe, reward swapped
    assert ours["run"] == {**recipe["run"], "output_dir": "runs/flux-dev-srpo-hpsv3"}
