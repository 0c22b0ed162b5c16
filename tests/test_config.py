"""Configuration: defaults, YAML + --set parsing, unknown keys, types, ranges, choices, shipped configs."""

from __future__ import annotations

import dataclasses
import re
from importlib import resources
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from directalign.engine.config import (
    CHOICES,
    Config,
    ConfigError,
    build_config,
    diff_from_defaults,
    load_config,
    load_yaml,
    parse_override,
    validate,
)


def _sections():
    return {f.name: f for f in dataclasses.fields(Config)}


# --------------------------------------------------------------------------------------------------- defaults
def test_defaults_validate_and_match_official_settings():
    cfg = Config()
    validate(cfg)
    assert build_config() == cfg
    assert build_config({}, []) == cfg
    s, t = cfg.srpo, cfg.train
    assert (s.rollout_steps, s.shift, s.train_guidance) == (25, 3.0, 3.5)
    assert s.window == [5, 25] and s.grid_points == 1000 and s.groundtruth_ratio == 0.9
    assert s.discount_pos == [0.1, 0.25] and s.discount_inv == [0.3, 0.01]
    assert s.loss == "hinge" and s.hinge_threshold == 0.7
    assert t.learning_rate == 5e-6 and t.weight_decay == 1e-4 and t.grad_clip == 0.1
    assert diff_from_defaults(cfg) == {}


def test_defaults_are_not_shared_between_instances():
    a, b = Config(), Config()
    a.srpo.window.append(99)
    assert b.srpo.window == [5, 25]


# --------------------------------------------------------------------------------------------------- parsing
def test_parse_override_nested_and_values():
    assert parse_override("srpo.window=[10,25]") == {"srpo": {"window": [10, 25]}}
    assert parse_override("train.learning_rate=1e-3") == {"train": {"learning_rate": "1e-3"}} or \
        parse_override("train.learning_rate=1e-3") == {"train": {"learning_rate": 1e-3}}
    assert parse_override("method=direct-align") == {"method": "direct-align"}
    assert parse_override("run.output_dir=a=b") == {"run": {"output_dir": "a=b"}}
    assert parse_override("reward.positive_words=[Real, Detail]") == {"reward": {"positive_words": ["Real", "Detail"]}}


@pytest.mark.parametrize("bad", ["train.steps", "=3", "train..steps=3", ".steps=3", "train.=3"])
def test_parse_override_malformed(bad):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(bad)


def test_set_overrides_parse_types():
    cfg = build_config({}, [
        "train.learning_rate=1e-3", "train.weight_decay=0", "srpo.shift=2", "train.adam_eps=1E-10",
        "srpo.window=[10, 30]", "reward.positive_words=[Real, Detail]", "eval.seeds=[3,4,5]",
        "train.gradient_checkpointing=true", "run.progress=False", "srpo.inversion_branch=no",
        "train.adam_betas=[0.8, 0.99]", "srpo.discount_pos=[-0.1, 2e-1]", "run.output_dir=runs/x y",
        "train.steps=7",
    ])
    t, s = cfg.train, cfg.srpo
    assert t.learning_rate == 1e-3 and isinstance(t.learning_rate, float)
    assert t.weight_decay == 0.0 and isinstance(t.weight_decay, float)
    assert s.shift == 2.0 and isinstance(s.shift, float)
    assert t.adam_eps == 1e-10
    assert s.window == [10, 30]
    assert cfg.reward.positive_words == ["Real", "Detail"]
    assert cfg.eval.seeds == [3, 4, 5]
    assert t.gradient_checkpointing is True and cfg.run.progress is False
    assert s.inversion_branch is False  # YAML 1.1 boolean
    assert t.adam_betas == [0.8, 0.99]
    assert s.discount_pos == [-0.1, 0.2]
    assert cfg.run.output_dir == "runs/x y"
    assert t.steps == 7 and isinstance(t.steps, int)


def test_later_overrides_win_and_merge_with_yaml(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 10\n  learning_rate: 1e-4\nsrpo:\n  window: [4, 20]\n  shift: 1.0\n")
    cfg = load_config(f, ["train.steps=12", "train.steps=13", "srpo.shift=2.5"])
    assert cfg.train.steps == 13
    assert cfg.train.learning_rate == 1e-4  # YAML file exponent without a dot
    assert cfg.srpo.window == [4, 20] and cfg.srpo.shift == 2.5
    # untouched keys of a section given in the file keep their defaults
    assert cfg.train.batch_size == Config().train.batch_size
    assert cfg.srpo.grid_points == 1000


def test_empty_yaml_is_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing\n")
    assert load_config(f) == Config()


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(lst)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  prompts: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        load_yaml(latin)


# --------------------------------------------------------------------------------------------------- unknown keys
def test_unknown_top_level_key_names_it_and_lists_allowed():
    with pytest.raises(ConfigError) as e:
        build_config({}, ["trian.steps=3"])
    msg = str(e.value)
    assert "'trian'" in msg
    for name in _sections():
        assert name in msg
    assert "\n" not in msg


def test_unknown_nested_key_names_it_and_lists_allowed():
    with pytest.raises(ConfigError) as e:
        build_config({"srpo": {"windw": [1, 2]}})
    msg = str(e.value)
    assert "srpo.windw" in msg
    for f in dataclasses.fields(type(Config().srpo)):
        assert f.name in msg
    assert "train" not in msg.split("allowed keys here:")[1].split(", ")


def test_section_given_a_scalar():
    with pytest.raises(ConfigError, match="train"):
        build_config({"train": 5})
    with pytest.raises(ConfigError, match="train.steps"):
        build_config({}, ["train.steps.x=3"])


# --------------------------------------------------------------------------------------------------- types
@pytest.mark.parametrize("override,key", [
    ("train.steps=abc", "train.steps"),
    ("train.steps=2.5", "train.steps"),
    ("train.steps=true", "train.steps"),
    ("train.learning_rate=fast", "train.learning_rate"),
    ("train.learning_rate=true", "train.learning_rate"),
    ("train.learning_rate=[1e-3]", "train.learning_rate"),
    ("run.progress=maybe", "run.progress"),
    ("run.progress=1", "run.progress"),
    ("srpo.window=5", "srpo.window"),
    ("srpo.window=[5, x]", "srpo.window[1]"),
    ("model.path=[a]", "model.path"),
    ("model.path=12", "model.path"),
    ("eval.seeds=[0.5]", "eval.seeds[0]"),
])
def test_wrong_types_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        build_config({}, [override])
    assert str(e.value).startswith(key + ":"), str(e.value)


def test_integral_float_accepted_for_int():
    assert build_config({}, ["train.steps=3.0"]).train.steps == 3


# --------------------------------------------------------------------------------------------------- ranges
@pytest.mark.parametrize("overrides,key", [
    (["srpo.window=[25, 25]"], "srpo.window"),
    (["srpo.window=[30, 10]"], "srpo.window"),
    (["srpo.window=[5, 51]"], "srpo.window"),
    (["srpo.schedule_steps=20", "srpo.window=[5, 25]"], "srpo.window"),
    (["srpo.window=[0, 10]"], "srpo.window"),
    (["srpo.window=[5]"], "srpo.window"),
    (["train.learning_rate=-1e-3"], "train.learning_rate"),
    (["train.learning_rate=0"], "train.learning_rate"),
    (["train.steps=0"], "train.steps"),
    (["train.steps=-4"], "train.steps"),
    (["train.batch_size=0"], "train.batch_size"),
    (["srpo.groundtruth_ratio=1.0"], "srpo.groundtruth_ratio"),
    (["srpo.groundtruth_ratio=-0.1"], "srpo.groundtruth_ratio"),
    (["srpo.denoise_branch=false", "srpo.inversion_branch=false"], "srpo.denoise_branch"),
    (["srpo.rollout_steps=0"], "srpo.rollout_steps"),
    (["srpo.grid_points=11"], "srpo.grid_points"),
    (["srpo.shift=0"], "srpo.shift"),
    (["train.adam_betas=[0.9, 1.0]"], "train.adam_betas"),
    (["train.ema_decay=1.0"], "train.ema_decay"),
    (["train.grad_clip=-1"], "train.grad_clip"),
    (["run.keep_checkpoints=0"], "run.keep_checkpoints"),
    (["eval.seeds=[]"], "eval.seeds"),
    (["model.height=4"], "model.height"),
    (["reward.positive_words=[]"], "reward.positive_words"),
    (["srpo.discount_pos=[0.1]"], "srpo.discount_pos"),
])
def test_out_of_range_values(overrides, key):
    with pytest.raises(ConfigError) as e:
        build_config({}, overrides)
    assert str(e.value).startswith(key), str(e.value)


def test_in_range_edges_accepted():
    cfg = build_config({}, ["srpo.window=[1, 50]", "srpo.groundtruth_ratio=0.0", "srpo.inversion_branch=false",
                            "train.grad_clip=0", "train.steps=1", "srpo.grid_points=12", "srpo.window_margin=5",
                            "reward.form=absolute", "reward.positive_words=[]"])
    assert cfg.srpo.window == [1, 50]


@pytest.mark.parametrize("key", sorted(CHOICES))
def test_bad_choice_lists_allowed_values(key):
    with pytest.raises(ConfigError) as e:
        build_config({}, [f"{key}=not-a-choice"])
    msg = str(e.value)
    assert msg.startswith(key) and "not-a-choice" in msg
    for allowed in CHOICES[key]:
        assert str(allowed) in msg


# --------------------------------------------------------------------------------------------------- diff
def test_diff_from_defaults():
    cfg = build_config({}, ["train.steps=7", "srpo.window=[10,25]", "reward.form=relative", "run.progress=false",
                            "train.learning_rate=5e-6"])  # the default value: not a difference
    assert diff_from_defaults(cfg) == {"train.steps": 7, "srpo.window": [10, 25], "reward.form": "relative",
                                       "run.progress": False}


# --------------------------------------------------------------------------------------------------- shipped
def _shipped():
    root = Path(str(resources.files("directalign"))) / "configs"
    return sorted(root.glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "tiny-srpo.yaml" for p in _shipped())


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = load_config(path)
    validate(cfg)
    # every key written in the file is honoured (nothing silently dropped or left as a string)
    for section, values in raw.items():
        if isinstance(values, dict):
            for k, v in values.items():
                got = getattr(getattr(cfg, section), k)
                assert got == v or (isinstance(v, str) and got == float(v)), f"{section}.{k}"
        else:
            assert getattr(cfg, section) == values
    # YAML round trip
    assert build_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_tiny_config_settings():
    cfg = load_config(Path(str(resources.files("directalign"))) / "configs" / "tiny-srpo.yaml")
    assert cfg.train.learning_rate == 3e-5 and cfg.srpo.window == [5, 30] and cfg.train.finetune == "lora"


# --------------------------------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=10**12))
def test_any_positive_steps_round_trips_through_set(n):
    cfg = build_config({}, [f"train.steps={n}"])
    assert cfg.train.steps == n
    assert build_config(yaml.safe_load(cfg.to_yaml())).train.steps == n


@settings(max_examples=30, deadline=None)
@given(st.integers(max_value=0))
def test_non_positive_steps_rejected(n):
    with pytest.raises(ConfigError, match="train.steps"):
        build_config({}, [f"train.steps={n}"])


_KNOWN = {f.name for f in dataclasses.fields(Config)}
_KEY = st.from_regex(re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,15}"), fullmatch=True)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(_KEY.filter(lambda k: k not in _KNOWN), st.sampled_from(["1", "x", "[1, 2]", "true", "1e-3"]))
def test_random_top_level_junk_keys_rejected(key, value):
    with pytest.raises(ConfigError) as e:
        build_config({}, [f"{key}={value}"])
    assert key in str(e.value)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.sampled_from(sorted(_KNOWN - {"method"})), _KEY)
def test_random_nested_junk_keys_rejected(section, key):
    fields = {f.name for f in dataclasses.fields(getattr(Config(), section))}
    if key in fields:
        return
    with pytest.raises(ConfigError) as e:
        build_config({}, [f"{section}.{key}=1"])
    assert f"{section}.{key}" in str(e.value)
