"""Configuration: defaults, YAML + --set parsing, unknown keys, types, ranges, choices, shipped configs, the one
section per method (a section of another method and a renamed key are one-line errors), Config value semantics."""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
from importlib import resources
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from directalign.config import (
    RENAMED,
    Config,
    all_choices,
    build_config,
    diff_from_defaults,
    load_config,
    load_run_config,
    packaged_config,
    validate,
)
from directalign.engine.config import (
    SHARED_SECTIONS,
    ConfigError,
    load_yaml,
    parse_override,
)
from directalign.methods.registry import METHODS, sections

CHOICES = all_choices()
SECTION_OWNERS = sections()  # {section: [methods using it]}


def _keys_of(method: str) -> list[str]:
    """The top-level keys of a resolved config of ``method``, in order."""
    return ["method", "model", "reward", "sampling", METHODS[method].section, "train", "eval", "run"]


def _owners(key: str) -> list[str | None]:
    """The methods a dotted key can be set with (None: any method, the key is in a shared section or is method)."""
    return SECTION_OWNERS.get(key.split(".")[0], [None]) if "." in key else [None]


def _with_method(method: str | None, *overrides: str) -> list[str]:
    return ([f"method={method}"] if method else []) + list(overrides)


# --------------------------------------------------------------------------------------------------- defaults
def test_defaults_validate_and_match_official_settings():
    cfg = Config()
    validate(cfg)
    assert build_config() == cfg
    assert build_config({}, []) == cfg
    s, t = cfg.srpo, cfg.train
    assert (s.rollout_steps, cfg.sampling.shift, s.train_guidance) == (25, 3.0, 3.5)
    assert s.window == [5, 25] and s.grid_points == 1000 and s.groundtruth_ratio == 0.9
    assert s.discount_pos == [0.1, 0.25] and s.discount_inv == [0.3, 0.01]
    assert s.loss == "hinge" and s.hinge_threshold == 0.7
    assert t.learning_rate == 5e-6 and t.weight_decay == 1e-4 and t.grad_clip == 0.1
    assert cfg.reward.relative_k == 0.175 and cfg.reward.clamp_resized is True
    assert diff_from_defaults(cfg) == {}


@pytest.mark.parametrize("method", list(METHODS))
def test_defaults_of_every_method_validate(method):
    cfg = Config(method)
    validate(cfg)
    assert build_config({}, [f"method={method}"]) == cfg
    assert diff_from_defaults(cfg) == ({} if method == "srpo" else {"method": method})


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
        "train.learning_rate=1e-3", "train.weight_decay=0", "sampling.shift=2", "train.adam_eps=1E-10",
        "srpo.window=[10, 30]", "reward.positive_words=[Real, Detail]", "eval.seeds=[3,4,5]",
        "train.gradient_checkpointing=true", "run.progress=False", "srpo.inversion_branch=no",
        "train.adam_betas=[0.8, 0.99]", "srpo.discount_pos=[-0.1, 2e-1]", "run.output_dir=runs/x y",
        "train.steps=7",
    ])
    t, s = cfg.train, cfg.srpo
    assert t.learning_rate == 1e-3 and isinstance(t.learning_rate, float)
    assert t.weight_decay == 0.0 and isinstance(t.weight_decay, float)
    assert cfg.sampling.shift == 2.0 and isinstance(cfg.sampling.shift, float)
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
    f.write_text("train:\n  steps: 10\n  learning_rate: 1e-4\nsrpo:\n  window: [4, 20]\nsampling:\n  shift: 1.0\n")
    cfg = load_config(f, ["train.steps=12", "train.steps=13", "sampling.shift=2.5"])
    assert cfg.train.steps == 13
    assert cfg.train.learning_rate == 1e-4  # YAML file exponent without a dot
    assert cfg.srpo.window == [4, 20] and cfg.sampling.shift == 2.5
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
@pytest.mark.parametrize("method", list(METHODS))
def test_unknown_top_level_key_names_it_and_lists_allowed(method):
    """The allowed keys listed are the method's own: the shared sections and its one section, no other method's."""
    with pytest.raises(ConfigError) as e:
        build_config({}, [f"method={method}", "trian.steps=3"])
    msg = str(e.value)
    assert "'trian'" in msg
    allowed = msg.split("allowed keys here: ")[1].split(", ")
    assert sorted(allowed) == sorted(_keys_of(method))
    assert "\n" not in msg


def test_unknown_key_with_a_line_break_is_one_line():
    """A YAML key or --set key holding a line break is quoted, so the message stays one line."""
    for data, overrides in [({}, ["a\nb=1"]), ({}, ["train.st\neps=1"]), ({"x\ry": 1}, []),
                            ({"train": {"steps\u2028": 1}}, [])]:
        with pytest.raises(ConfigError, match="unknown config key") as e:
            build_config(data, overrides)
        assert len(str(e.value).splitlines()) == 1, str(e.value)


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
    (["sampling.shift=0"], "sampling.shift"),
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


def test_all_choices_cover_every_section_of_every_method():
    """Every field declared with choice(...) in a shared section or a method's section is in all_choices()."""
    declared = {"method", "model.family", "reward.kind"}
    for name, cls in [*SHARED_SECTIONS.items(), *((s.section, s.config) for s in METHODS.values())]:
        declared |= {f"{name}.{f.name}" for f in dataclasses.fields(cls) if f.metadata.get("choices")}
    assert set(CHOICES) == declared
    assert CHOICES["method"] == tuple(METHODS)
    assert {"grpo.sde", "alignprop.truncation", "srpo.loss", "train.finetune"} <= set(CHOICES)
    assert all(len(v) >= 2 for v in CHOICES.values())


_CHOICE_CASES = [(key, m) for key in sorted(CHOICES) for m in _owners(key)]


@pytest.mark.parametrize("key,method", _CHOICE_CASES, ids=[f"{k}-{m or 'any'}" for k, m in _CHOICE_CASES])
def test_bad_choice_lists_allowed_values(key, method):
    """Every choice field of every section (set with its own method) rejects a value outside its set, one line."""
    with pytest.raises(ConfigError) as e:
        build_config({}, _with_method(method, f"{key}=not-a-choice"))
    msg = str(e.value)
    assert msg.startswith(key) and "not-a-choice" in msg and "\n" not in msg
    assert msg.endswith("choose one of " + ", ".join(map(str, CHOICES[key])))


# fields another field constrains: an allowed value needs a companion setting to be valid as a whole
_COMPANIONS = {("train.distributed", "fsdp"): ["train.finetune=full"],
               ("dpo.data", "offline"): ["dpo.offline_data=pairs.jsonl"]}


@pytest.mark.parametrize("key,method", _CHOICE_CASES, ids=[f"{k}-{m or 'any'}" for k, m in _CHOICE_CASES])
def test_every_allowed_choice_is_accepted(key, method):
    for value in CHOICES[key]:
        cfg = build_config({}, _with_method(method, f"{key}={value}", *_COMPANIONS.get((key, value), [])))
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value


# --------------------------------------------------------------------------------------------------- diff
def test_diff_from_defaults_of_another_method():
    cfg = build_config({}, ["method=grpo", "grpo.sde=flow", "sampling.shift=1.0"])
    assert diff_from_defaults(cfg) == {"method": "grpo", "grpo.sde": "flow", "sampling.shift": 1.0}


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


def test_every_method_has_a_shipped_config():
    shipped = {load_config(p).method for p in _shipped()}
    assert shipped == set(METHODS)


@pytest.mark.parametrize("path", _shipped(), ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    cfg = load_config(path)
    validate(cfg)
    assert packaged_config(path.stem) == path
    # every key written in the file is honoured (nothing silently dropped or left as a string)
    for section, values in raw.items():
        if isinstance(values, dict):
            for k, v in values.items():
                got = getattr(getattr(cfg, section), k)
                assert got == v or (isinstance(v, str) and got == float(v)), f"{section}.{k}"
        else:
            assert getattr(cfg, section) == values
    # the file writes no section of another method, and the resolved config holds exactly its own keys
    own = METHODS[cfg.method].section
    assert not (set(raw) & set(SECTION_OWNERS)) - {own}
    dumped = yaml.safe_load(cfg.to_yaml())
    assert list(dumped) == _keys_of(cfg.method)
    assert list(cfg.to_dict()) == _keys_of(cfg.method)
    # YAML round trip (Config.__eq__)
    assert build_config(dumped) == cfg


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


_KNOWN = {"method", *SHARED_SECTIONS, *SECTION_OWNERS}
_KEY = st.from_regex(re.compile(r"[A-Za-z_][A-Za-z0-9_\-]{0,15}"), fullmatch=True)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(_KEY.filter(lambda k: k not in _KNOWN), st.sampled_from(["1", "x", "[1, 2]", "true", "1e-3"]))
def test_random_top_level_junk_keys_rejected(key, value):
    with pytest.raises(ConfigError) as e:
        build_config({}, [f"{key}={value}"])
    assert key in str(e.value)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(st.sampled_from(list(METHODS)), st.sampled_from(sorted(_KNOWN - {"method"})), _KEY)
def test_random_nested_junk_keys_rejected(method, section, key):
    """With the section's own method; a renamed key (srpo.shift) gets its hint, which names the key too."""
    if section in SECTION_OWNERS and method not in SECTION_OWNERS[section]:
        method = SECTION_OWNERS[section][0]
    fields = {f.name for f in dataclasses.fields(getattr(Config(method), section))}
    if key in fields:
        return
    with pytest.raises(ConfigError) as e:
        build_config({}, [f"method={method}", f"{section}.{key}=1"])
    assert f"{section}.{key}" in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------- one section
@pytest.mark.parametrize("method", list(METHODS))
def test_resolved_config_holds_exactly_the_methods_keys(method):
    cfg = Config(method)
    assert list(cfg.to_dict()) == _keys_of(method)
    assert list(yaml.safe_load(cfg.to_yaml())) == _keys_of(method)
    assert cfg.method_section is getattr(cfg, METHODS[method].section)
    assert [name for name, _ in cfg.section_items()] == _keys_of(method)[1:]


_FOREIGN = [(m, s) for m in METHODS for s in SECTION_OWNERS if s != METHODS[m].section]


@pytest.mark.parametrize("method,section", _FOREIGN, ids=[f"{m}-{s}" for m, s in _FOREIGN])
def test_a_section_of_another_method_is_a_one_line_error_naming_its_method(method, section, tmp_path):
    owners = SECTION_OWNERS[section]
    key = dataclasses.fields(METHODS[owners[0]].config)[0].name  # a real key of that section
    f = tmp_path / "c.yaml"
    f.write_text(f"method: {method}\n{section}: {{}}\n", encoding="utf-8")
    attempts = [lambda: build_config({}, [f"method={method}", f"{section}.{key}=1"]),
                lambda: build_config({"method": method, section: {}}),
                lambda: build_config({"method": method, section: None}),
                lambda: load_config(f)]
    for attempt in attempts:
        with pytest.raises(ConfigError) as e:
            attempt()
        msg = str(e.value)
        shipped = f" (a shipped config of {method}: --config tiny-{method})"  # every method ships a tiny config
        assert msg == (f"section '{section}' belongs to method {' / '.join(owners)}, but method is {method}; "
                       f"remove the section or set method: {owners[0]}{shipped}")
    # with the section's own method the same settings load
    for owner in owners:
        assert build_config({"method": owner, section: {}}) == Config(owner)


def test_a_section_of_another_method_is_not_an_attribute():
    cfg = Config("srpo")
    with pytest.raises(AttributeError, match="grpo"):
        _ = cfg.grpo
    assert not hasattr(cfg, "draft") and hasattr(cfg, "srpo")
    assert hasattr(Config("draft-lv"), "draft") and not hasattr(Config("draft-lv"), "srpo")


@pytest.mark.parametrize("method", list(METHODS))
def test_renamed_srpo_shift_gives_the_new_key(method, tmp_path):
    """``srpo.shift`` moved to ``sampling.shift``: in a YAML or via --set, with any method, a one-line hint."""
    assert RENAMED == {"srpo.shift": "sampling.shift"}
    f = tmp_path / "c.yaml"
    f.write_text(f"method: {method}\nsrpo:\n  shift: 2.0\n", encoding="utf-8")
    expected = "config key 'srpo.shift' was renamed; use sampling.shift instead"
    for attempt in (lambda: load_config(f), lambda: build_config({}, [f"method={method}", "srpo.shift=2.0"]),
                    lambda: load_config(packaged_config("tiny-srpo"), ["srpo.shift=1"])):
        with pytest.raises(ConfigError) as e:
            attempt()
        assert str(e.value) == expected
    assert build_config({}, [f"method={method}", "sampling.shift=2.0"]).sampling.shift == 2.0


def _legacy_run_config(cfg: Config) -> dict:
    """What a run of ``cfg`` saved before the per-method sections: every method's section (the others at their
    defaults), no sampling section, the shift as srpo.shift."""
    data = cfg.to_dict()
    shift = data.pop("sampling")["shift"]
    for name, owners in SECTION_OWNERS.items():
        data.setdefault(name, dataclasses.asdict(getattr(Config(owners[0]), name)))
    data["srpo"]["shift"] = shift
    return data


@pytest.mark.parametrize("method", ["srpo", "grpo", "draft-lv"])
def test_a_run_config_of_the_old_layout_is_migrated(method, tmp_path):
    """A run saved before the redesign: eval, report, load_run and --resume read it (other methods' sections
    dropped, srpo.shift -> sampling.shift), each change noted once; a user's own YAML still gets the one-line error."""
    cfg = build_config({}, [f"method={method}", "train.steps=7", "sampling.shift=2.0"])
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(_legacy_run_config(cfg)), encoding="utf-8")
    notes = []
    assert load_run_config(f, log=notes.append) == cfg
    others = [name for name in SECTION_OWNERS if name != METHODS[method].section]
    assert notes == [f"{f}: written by an older directalign; srpo.shift is now sampling.shift (= 2.0)",
                     f"{f}: written by an older directalign; dropped the sections of other methods "
                     f"({', '.join(others)}): method {method} does not read them"]
    assert load_run_config(f, ["train.steps=9"], log=notes.append).train.steps == 9
    with pytest.raises(ConfigError, match="renamed; use sampling.shift"):
        load_config(f)
    # a run of today's layout is read as it is, with nothing to note
    f.write_text(cfg.to_yaml(), encoding="utf-8")
    notes.clear()
    assert load_run_config(f, log=notes.append) == cfg and notes == []
    # a set sampling.shift wins over the old key
    legacy = _legacy_run_config(cfg)
    legacy["sampling"] = {"shift": 1.5}
    f.write_text(yaml.safe_dump(legacy), encoding="utf-8")
    assert load_run_config(f, log=notes.append).sampling.shift == 1.5


def test_load_run_reads_an_old_run_dir(tmp_path):
    from directalign.api import load_run

    cfg = build_config({}, ["method=refl", "sampling.shift=2.5"])
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(_legacy_run_config(cfg)), encoding="utf-8")
    run = load_run(tmp_path)
    assert run.config == cfg and run.config.sampling.shift == 2.5


# --------------------------------------------------------------------------------------------------- Config values
@pytest.mark.parametrize("method", list(METHODS))
def test_config_copies_pickles_and_compares_by_value(method):
    cfg = build_config({}, [f"method={method}", "train.steps=7", "sampling.shift=2.0"])
    for twin in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), build_config(yaml.safe_load(cfg.to_yaml()))):
        assert twin == cfg and twin is not cfg
        assert twin.method == method and twin.method_section == cfg.method_section
    deep = copy.deepcopy(cfg)
    deep.train.steps = 8
    assert deep != cfg and cfg.train.steps == 7  # a deep copy shares no section
    assert cfg != cfg.defaults() and cfg.defaults() == Config(method)
    assert cfg != cfg.to_dict() and cfg != None


def test_configs_of_different_methods_differ():
    assert Config("srpo") != Config("direct-align")  # same sections, different method
    assert Config("draft-k") != Config("draft-lv")


def test_assigning_a_section_replaces_it():
    cfg = Config()
    cfg.train = dataclasses.replace(cfg.train, steps=3)
    assert cfg.to_dict()["train"]["steps"] == 3 and cfg != Config()
    assert yaml.safe_load(cfg.to_yaml())["train"]["steps"] == 3
    with pytest.raises(AttributeError, match="grpo"):
        cfg.grpo = Config("grpo").grpo
