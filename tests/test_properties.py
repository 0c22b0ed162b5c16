"""Property-based tests (hypothesis) of the flow math and the config parser, beyond tests/test_flow.py and
tests/test_config.py: inverses and compositions of the time shift, exact Euler integration for any schedule, the
window draw's invariants for any grid size, ratio and margin, and a config parser that round-trips every valid
override set of every method and answers every invalid value (a wrong type, a value out of range, a key of another
method's section) with a one-line ConfigError naming the key (never another exception)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from directalign import flow
from directalign.config import (
    Config,
    all_choices,
    build_config,
    diff_from_defaults,
    load_config,
)
from directalign.engine.config import SHARED_SECTIONS, ConfigError
from directalign.methods.registry import METHODS, sections

FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
unit = st.floats(0.0, 1.0, allow_nan=False)
shifts = st.floats(0.05, 20.0, allow_nan=False)


# ================================================================================================= flow math
@FAST
@given(t=unit, s=shifts)
def test_shift_is_inverted_by_the_reciprocal_shift(t, s):
    y = flow.shift_sigmas(torch.tensor(t, dtype=torch.float64), s)
    back = flow.shift_sigmas(y, 1.0 / s)
    assert back.item() == pytest.approx(t, abs=1e-12)


@FAST
@given(t=unit, a=shifts, b=shifts)
def test_shifts_compose_multiplicatively(t, a, b):
    x = torch.tensor(t, dtype=torch.float64)
    twice = flow.shift_sigmas(flow.shift_sigmas(x, a), b)
    assert twice.item() == pytest.approx(flow.shift_sigmas(x, a * b).item(), abs=1e-12)


@FAST
@given(ts=st.lists(unit, min_size=2, max_size=20), s=shifts)
def test_shift_is_monotone_and_stays_in_the_unit_interval(ts, s):
    x = torch.tensor(sorted(ts), dtype=torch.float64)
    y = flow.shift_sigmas(x, s)
    assert torch.all(y >= 0) and torch.all(y <= 1 + 1e-12)  # t = 1 maps to 1 up to rounding for some shifts
    assert torch.all(y[1:] >= y[:-1])
    strict = x[1:] > x[:-1] + 1e-9
    assert torch.all(y[1:][strict] > y[:-1][strict])


@FAST
@given(t=st.floats(0.001, 0.999), a=shifts, b=shifts)
def test_larger_shift_means_more_noise(t, a, b):
    assume(abs(a - b) > 1e-6)
    lo, hi = sorted((a, b))
    x = torch.tensor(t, dtype=torch.float64)
    assert flow.shift_sigmas(x, lo).item() < flow.shift_sigmas(x, hi).item()


@FAST
@given(n=st.integers(1, 400), s=shifts)
def test_schedule_is_strictly_descending_from_one_to_zero(n, s):
    sched = flow.sigma_schedule(n, s)
    assert len(sched) == n + 1
    # s * t / (1 + (s - 1) t) at t = 1 is 1 up to rounding (exactly 1 for integer shifts such as the official 3)
    assert sched[0].item() == pytest.approx(1.0, abs=1e-12) and sched[-1].item() == 0.0
    assert torch.all(sched[1:] < sched[:-1])


@FAST
@given(n=st.integers(1, 60), s=shifts, start=st.integers(0, 59), seed=st.integers(0, 10_000))
def test_euler_with_the_exact_velocity_follows_the_straight_path(n, s, start, seed):
    """From x at any schedule point, Euler with v = eps - x0 lands exactly on the interpolation at every later one."""
    start = min(start, n - 1)
    g = torch.Generator().manual_seed(seed)
    x0, eps = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    sched = flow.sigma_schedule(n, s)[start:]
    x = flow.interpolate(x0, eps, sched[0])
    out = flow.euler_ode(x, sched, lambda x, sigma: eps - x0)
    assert torch.allclose(out, x0, atol=1e-9)
    half = flow.euler_ode(x, sched[: len(sched) // 2 + 1], lambda x, sigma: eps - x0)
    assert torch.allclose(half, flow.interpolate(x0, eps, sched[len(sched) // 2]), atol=1e-9)


@FAST
@given(a=unit, b=unit, seed=st.integers(0, 10_000))
def test_euler_step_there_and_back_is_the_identity(a, b, seed):
    g = torch.Generator().manual_seed(seed)
    x, v = torch.randn(2, 5, generator=g, dtype=torch.float64)
    there = flow.euler_step(x, v, a, b)
    assert torch.allclose(flow.euler_step(there, v, b, a), x, atol=1e-12)


@FAST
@given(sig=st.lists(st.floats(0.0, 0.99), min_size=1, max_size=6), seed=st.integers(0, 10_000))
def test_recover_inverts_inject_per_sample(sig, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(len(sig), 3, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(len(sig), 3, 2, generator=g, dtype=torch.float64)
    s = torch.tensor(sig, dtype=torch.float64)
    assert torch.allclose(flow.recover_x0(flow.interpolate(x0, eps, s), eps, s), x0, atol=1e-9)


@st.composite
def windows(draw):
    steps = draw(st.integers(2, 100))
    t0 = draw(st.integers(0, steps - 1))
    t1 = draw(st.integers(t0 + 1, steps))
    return steps, draw(shifts), t0, t1


@FAST
@given(w=windows(), n=st.integers(2, 2000))
def test_training_grid_spans_the_window(w, n):
    steps, s, t0, t1 = w
    grid = flow.training_sigma_grid(steps, s, t0, t1, n)
    sched = flow.sigma_schedule(steps, s)
    assert len(grid) == n
    assert grid[0].item() == pytest.approx(sched[t0].item(), abs=1e-15)
    assert grid[-1].item() == pytest.approx(sched[t1].item(), abs=1e-15)
    assert torch.all(grid[1:] < grid[:-1])
    assert torch.all((grid >= 0) & (grid <= 1 + 1e-12))


@FAST
@given(n=st.integers(2, 5000), ratio=st.floats(0.0, 0.999999), ratio2=st.floats(0.0, 0.999999))
def test_model_share_is_positive_bounded_and_shrinks_with_the_ratio(n, ratio, ratio2):
    k = flow.model_share_steps(n, ratio)
    assert 1 <= k <= n + 1
    lo, hi = sorted((ratio, ratio2))
    assert flow.model_share_steps(n, hi) <= flow.model_share_steps(n, lo)


@st.composite
def draws(draw):
    margin = draw(st.integers(1, 25))
    n = draw(st.integers(2 * margin + 2, 3000))
    return n, margin, draw(st.floats(0.0, 0.999)), draw(st.integers(0, 2**31)), draw(windows())


@settings(max_examples=150, deadline=None)
@given(d=draws())
def test_draw_window_invariants(d):
    n, margin, ratio, seed, (steps, s, t0, t1) = d
    grid = flow.training_sigma_grid(steps, s, t0, t1, n)
    w = flow.draw_window(grid, ratio, torch.Generator().manual_seed(seed), margin=margin)
    big_k = flow.model_share_steps(n, ratio)
    assert margin <= w.m <= n - margin  # inclusive, as the official randint(5, N - 5)
    assert w.k_steps == min(n - w.m, big_k, w.m) and w.k_steps >= 1
    assert w.m_inversion == max(w.m - w.k_steps, 1)
    # the sigmas are grid points at the documented indices
    assert w.denoise_query == grid[n - w.m - w.k_steps].item()
    assert w.denoise_target == grid[n - w.m].item()
    assert w.inversion_query == grid[n - w.m_inversion].item()
    assert w.inversion_target == grid[n - w.m_inversion - w.k_steps].item()
    lo, hi = grid[-1].item(), grid[0].item()
    for sigma in (w.denoise_query, w.denoise_target, w.inversion_query, w.inversion_target):
        assert lo <= sigma <= hi and sigma < 1 or t0 == 0
    # denoise goes down in noise, inversion goes up; the model's share is K grid steps
    assert w.denoise_query > w.denoise_target
    assert w.inversion_query < w.inversion_target
    assert w.delta_sigma > 0
    assert w.delta_sigma == pytest.approx(w.k_steps * (hi - lo) / (n - 1), rel=1e-6, abs=1e-13)
    if w.m - w.k_steps >= 1:  # unclamped: both branches recover at the same sigma
        assert w.inversion_target == w.denoise_target


@FAST
@given(s=st.lists(unit, min_size=1, max_size=10), levels=st.integers(1, 10_000))
def test_quantize_rounds_down_to_the_level_grid(s, levels):
    """Like the official ``int(sigma * 1000) / 1000`` (which, in floating point, is not idempotent: 0.58 -> 0.57)."""
    x = torch.tensor(s, dtype=torch.float64)
    q = flow.quantize_sigma(x, levels)
    assert torch.all(q <= x + 1e-12) and torch.all(x - q < 1.0 / levels + 1e-9)
    assert torch.allclose(q * levels, torch.round(q * levels), atol=1e-6)
    assert torch.equal(flow.quantize_sigma(x, 0), x)


@FAST
@given(n=st.integers(1, 1000), a=st.floats(-10, 10), b=st.floats(-10, 10), shift=shifts, data=st.data())
def test_ramps_hit_their_ends_and_stay_between(n, a, b, shift, data):
    i = data.draw(st.integers(0, n - 1))
    r = flow.linear_ramp(a, b, n, i)
    assert min(a, b) - 1e-9 <= r <= max(a, b) + 1e-9
    assert flow.linear_ramp(a, b, n, 0) == pytest.approx(a)
    assert flow.linear_ramp(a, b, n, n - 1) == pytest.approx(b if n > 1 else a)
    j = data.draw(st.integers(0, n))
    lam = flow.multiplicative_discount(n, j, shift)
    assert -1e-12 <= lam <= 1 + 1e-12
    if j < n:
        assert flow.multiplicative_discount(n, j + 1, shift) >= lam


# ================================================================================================= config
CHOICES = all_choices()
OWNERS = sections()  # {method section: [methods using it]}
ALL_SECTIONS = {**SHARED_SECTIONS, **{spec.section: spec.config for spec in METHODS.values()}}


def _leaves(cls, prefix):
    """(dotted key, annotated type) of every setting, found from the dataclasses (new settings are covered too)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _leaves(tp, key + ".")
        else:
            yield key, tp


# every setting of every section of every method
LEAVES = {key: tp for name, cls in ALL_SECTIONS.items() for key, tp in _leaves(cls, name + ".")}
SECTIONS = sorted(ALL_SECTIONS)


def _method_of(key: str) -> str:
    """A method whose config holds ``key`` (the default method for a shared section)."""
    return OWNERS.get(key.split(".")[0], ["srpo"])[0]


def _method_keys(method: str) -> set[str]:
    own = {"method", *SHARED_SECTIONS, METHODS[method].section}
    return {k for k in LEAVES if k.split(".")[0] in own}


def _nest(key: str, value) -> dict:
    out: dict = {}
    cur = out
    parts = key.split(".")
    for p in parts[:-1]:
        cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = value
    return out


def _is_yaml_string(s: str) -> bool:
    try:
        return yaml.safe_load(s) == s
    except yaml.YAMLError:
        return False


words = st.from_regex(r"[a-z][a-z0-9_\-]{0,11}", fullmatch=True).filter(_is_yaml_string)
paths = st.from_regex(r"[a-z][a-z0-9_\-]{0,8}(/[a-z0-9_\-]{1,8}){0,3}", fullmatch=True).filter(_is_yaml_string)
pos = st.floats(1e-9, 1e3, allow_nan=False, allow_infinity=False)


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


@st.composite
def valid_overrides(draw) -> dict:
    """A random set of valid settings {dotted key: value} of a random method, consistent across fields."""
    method = draw(st.sampled_from(list(METHODS)))
    out: dict = {"method": method}
    simple = {
        "train.steps": st.integers(1, 10**9), "train.batch_size": st.integers(1, 64), "train.learning_rate": pos,
        "train.weight_decay": st.floats(0, 1), "train.grad_clip": st.floats(0, 100), "train.warmup_steps":
        st.integers(0, 1000), "train.ema_decay": st.floats(0, 0.999), "train.lora_rank": st.integers(1, 256),
        "train.lora_alpha": pos, "train.lora_dropout": st.floats(0, 0.99), "train.seed": st.integers(0, 2**63 - 1),
        "train.adam_betas": st.lists(st.floats(0, 0.999), min_size=2, max_size=2),
        "train.shuffle_prompts": st.booleans(), "train.gradient_checkpointing": st.booleans(),
        "sampling.shift": st.floats(0.01, 20), "srpo.rollout_steps": st.integers(1, 100),
        "srpo.groundtruth_ratio": st.floats(0, 0.999), "srpo.hinge_threshold": st.floats(-10, 10),
        "srpo.quantize_timestep": st.integers(0, 10_000), "srpo.samples_per_rollout": st.integers(1, 4),
        "srpo.denoise_branch": st.just(True), "srpo.inversion_branch": st.booleans(),
        "eval.seeds": st.lists(st.integers(0, 2**40), min_size=1, max_size=4), "eval.guidance": st.floats(0, 20),
        "eval.steps": st.integers(1, 100), "run.output_dir": paths, "run.keep_checkpoints": st.integers(1, 10),
        "run.checkpoint_every": st.integers(0, 100), "reward.positive_words": st.lists(words, min_size=1,
                                                                                       max_size=3),
        "reward.negative_words": st.lists(words, min_size=1, max_size=3), "model.height": st.integers(8, 4096),
        "train.prompts": paths, "reward.relative_k": st.floats(-1, 1), "reward.clamp_resized": st.booleans(),
    }
    simple.update({k: st.sampled_from(v) for k, v in CHOICES.items() if k != "method"})
    own = _method_keys(method)
    simple = {k: v for k, v in simple.items() if k in own}
    for key in draw(st.sets(st.sampled_from(sorted(simple)), max_size=12)):
        out[key] = draw(simple[key])
    if out.get("train.distributed") == "fsdp":  # FSDP shards full fine-tuning only
        out["train.finetune"] = "full"
    if out.get("dpo.data") == "offline":  # offline DPO reads its pairs from a manifest
        out["dpo.offline_data"] = draw(paths)
    if METHODS[method].section != "srpo":
        return out
    if draw(st.booleans()):
        steps = draw(st.integers(2, 200))
        t0 = draw(st.integers(1, steps - 1))
        out["srpo.schedule_steps"], out["srpo.window"] = steps, [t0, draw(st.integers(t0 + 1, steps))]
    if draw(st.booleans()):
        margin = draw(st.integers(1, 20))
        out["srpo.window_margin"], out["srpo.grid_points"] = margin, draw(st.integers(2 * margin + 2, 5000))
    return out


@settings(max_examples=120, deadline=None)
@given(values=valid_overrides())
def test_valid_override_sets_round_trip(values, tmp_path_factory):
    cfg = build_config({}, [f"{k}={_fmt(v)}" for k, v in values.items()])
    for key, value in values.items():
        got = cfg
        for part in key.split("."):
            got = getattr(got, part)
        assert got == value and type(got) is type(value), (key, got, value)
    derived = set()  # SRPO's control words follow the reward kind when unset (rewards.control_words)
    if {"reward.kind", "reward.terms.kinds"} & set(values):
        derived = {"reward.positive_words", "reward.negative_words"}
    assert set(diff_from_defaults(cfg)) <= set(values) | derived
    again = build_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
    f = tmp_path_factory.mktemp("cfg") / "c.yaml"
    f.write_text(cfg.to_yaml(), encoding="utf-8")
    assert load_config(f) == cfg
    # the same settings as one nested mapping (a YAML file's shape) give the same config
    data: dict = {}
    for k, v in values.items():
        node = data
        parts = k.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    assert build_config(data) == cfg


junk_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                         st.text(max_size=20), st.lists(st.integers(), max_size=3),
                         st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))


def _wrong_for(tp):
    """Values that are not of type ``tp`` (in the parser's sense: an integral float is a valid int, and so on)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # optional (null: a default of its own)
        (inner,) = [a for a in args if a is not type(None)]
        return _wrong_for(inner).filter(lambda v: v is not None)
    if origin is list:
        return junk_scalars.filter(lambda v: not isinstance(v, (list, tuple)))
    if tp is bool:
        return junk_scalars.filter(lambda v: not isinstance(v, bool))
    if tp is int:
        return junk_scalars.filter(lambda v: isinstance(v, bool) or not isinstance(v, int)).filter(
            lambda v: not (isinstance(v, float) and math.isfinite(v) and v.is_integer()))
    if tp is float:
        bad_numbers = st.sampled_from([math.nan, math.inf, -math.inf, 10**400, "1e999", "-1e999"])
        return st.one_of(bad_numbers, junk_scalars.filter(
            lambda v: isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)).filter(
            lambda v: not (isinstance(v, str) and _is_float_text(v))))
    if tp is str:
        return junk_scalars.filter(lambda v: not isinstance(v, str))
    raise AssertionError(f"no strategy for {tp}")


def _is_float_text(v: str) -> bool:
    try:
        return math.isfinite(float(v))
    except ValueError:
        return False


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(sorted(LEAVES)), data=st.data())
def test_wrong_types_raise_a_config_error_naming_the_key(key, data):
    value = data.draw(_wrong_for(LEAVES[key]))
    assume(not (isinstance(value, bool) and ("yes" if value else "no") in CHOICES.get(key, ())))  # YAML's no
    with pytest.raises(ConfigError) as e:
        build_config({"method": _method_of(key), **_nest(key, value)})
    msg = str(e.value)
    assert msg.startswith(key), msg
    assert "\n" not in msg


@settings(max_examples=60, deadline=None)
@given(section=st.sampled_from(SECTIONS), value=junk_scalars.filter(lambda v: not isinstance(v, dict)))
def test_a_section_that_is_not_a_mapping_is_a_config_error(section, value):
    with pytest.raises(ConfigError, match=section):
        build_config({"method": _method_of(section + "."), section: value})


@st.composite
def out_of_range(draw):
    """(overrides, key the error must name) for values of the right type but outside what is allowed."""
    choice = draw(st.sampled_from([
        "steps", "lr", "batch", "window-order", "window-past-schedule", "window-zero", "ratio", "shift", "ema",
        "keep", "seed", "eval-seed", "grid", "betas", "margin"]))
    if choice == "steps":
        return [f"train.steps={draw(st.integers(-10**6, 0))}"], "train.steps"
    if choice == "lr":
        return [f"train.learning_rate={draw(st.floats(-1e3, 0.0))!r}"], "train.learning_rate"
    if choice == "batch":
        return [f"train.batch_size={draw(st.integers(-100, 0))}"], "train.batch_size"
    if choice == "window-order":
        t1 = draw(st.integers(1, 50))
        return [f"srpo.window=[{draw(st.integers(t1, 50))}, {t1}]"], "srpo.window"
    if choice == "window-past-schedule":
        steps = draw(st.integers(2, 100))
        return [f"srpo.schedule_steps={steps}", f"srpo.window=[1, {draw(st.integers(steps + 1, 10**4))}]"], \
            "srpo.window"
    if choice == "window-zero":
        return [f"srpo.window=[{draw(st.integers(-100, 0))}, {draw(st.integers(1, 50))}]"], "srpo.window"
    if choice == "ratio":
        r = draw(st.one_of(st.floats(-100, -1e-9), st.floats(1.0, 100)))
        return [f"srpo.groundtruth_ratio={r!r}"], "srpo.groundtruth_ratio"
    if choice == "shift":
        return [f"sampling.shift={draw(st.floats(-100, 0.0))!r}"], "sampling.shift"
    if choice == "ema":
        e = draw(st.one_of(st.floats(-10, -1e-9), st.floats(1.0, 10)))
        return [f"train.ema_decay={e!r}"], "train.ema_decay"
    if choice == "keep":
        return [f"run.keep_checkpoints={draw(st.integers(-10, 0))}"], "run.keep_checkpoints"
    if choice == "seed":
        s = draw(st.one_of(st.integers(-10**20, -1), st.integers(2**63, 2**70)))
        return [f"train.seed={s}"], "train.seed"
    if choice == "eval-seed":
        return [f"eval.seeds=[0, {draw(st.integers(-10**6, -1))}]"], "eval.seeds"
    if choice == "grid":
        m = draw(st.integers(1, 20))
        return [f"srpo.window_margin={m}", f"srpo.grid_points={draw(st.integers(0, 2 * m + 1))}"], \
            "srpo.grid_points"
    if choice == "margin":
        return [f"srpo.window_margin={draw(st.integers(-10, 0))}"], "srpo.window_margin"
    b = draw(st.one_of(st.floats(1.0, 10), st.floats(-10, -1e-9)))
    return [f"train.adam_betas=[0.9, {b!r}]"], "train.adam_betas"


@settings(max_examples=200, deadline=None)
@given(case=out_of_range())
def test_out_of_range_values_raise_a_config_error_naming_the_key(case):
    overrides, key = case
    with pytest.raises(ConfigError) as e:
        build_config({}, overrides)
    assert key in str(e.value) and "\n" not in str(e.value)


yamlish = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["[1, 2", "{a: 1}", "!!python/object/apply:os.system ['true']", "&a [*a]", "*", "%", "~",
                     "null", "1e999", ".nan", "-.inf", "0x1F", "0o17", "1_000", "2024-01-01", "12:30:00", "'x",
                     "[[[[[]]]]]", "{", "- a\n- b", "? a", "|\n  x", "\x00", "\t", "🙂", "1" * 400]),
)


@settings(max_examples=400, deadline=None)
@given(key=st.sampled_from(sorted(LEAVES) + ["nope", "train.nope", "srpo", "grpo", "srpo.shift"]), raw=yamlish,
       method=st.sampled_from([None, *METHODS]))
def test_any_set_text_gives_a_config_or_a_config_error(key, raw, method):
    """Whatever follows ``--set key=``, with the key's own method or any other, the parser answers with a Config or
    a one-line ConfigError."""
    method = method or _method_of(key)
    try:
        cfg = build_config({}, [f"method={method}", f"{key}={raw}"])
    except ConfigError as e:
        assert "\n" not in str(e) or "\n" in raw
        return
    assert isinstance(cfg, Config)
    assert build_config(yaml.safe_load(cfg.to_yaml())) == cfg


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20), st.floats(allow_nan=True), st.text(max_size=8)),
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(["steps", "window", "x", "kinds", "paths", "seed",
                                                                "shift", "sde"]),
                                               children, max_size=3)),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(data=st.dictionaries(st.sampled_from(SECTIONS + ["method", "bogus"]), json_values, max_size=3),
       method=st.sampled_from([None, *METHODS]))
def test_any_parsed_yaml_gives_a_config_or_a_config_error(data, method):
    if method is not None:
        data = {"method": method, **data}
    try:
        cfg = build_config(data)
    except ConfigError as e:
        assert len(str(e).splitlines()) == 1, str(e)
        return
    assert isinstance(cfg, Config)
    assert list(cfg.to_dict()) == ["method", "model", "reward", "sampling", METHODS[cfg.method].section, "train",
                                   "eval", "run"]


_FOREIGN_KEYS = [(m, k) for m in METHODS for k in sorted(LEAVES)
                 if k.split(".")[0] in OWNERS and m not in OWNERS[k.split(".")[0]]]


@settings(max_examples=150, deadline=None)
@given(case=st.sampled_from(_FOREIGN_KEYS), value=st.sampled_from(["1", "x", "[1, 2]", "true", "{}"]),
       via_set=st.booleans())
def test_a_key_of_another_methods_section_names_the_method_it_belongs_to(case, value, via_set):
    method, key = case
    section = key.split(".")[0]
    with pytest.raises(ConfigError) as e:
        if via_set:
            build_config({}, [f"method={method}", f"{key}={value}"])
        else:
            build_config({"method": method, **_nest(key, yaml.safe_load(value))})
    msg = str(e.value)
    assert msg.startswith(f"section '{section}' belongs to method {' / '.join(OWNERS[section])}, but method is "
                          f"{method};"), msg
    assert "\n" not in msg


@settings(max_examples=60, deadline=None)
@given(method=st.sampled_from(list(METHODS)), value=st.one_of(st.floats(allow_nan=True), st.integers(), words),
       via_set=st.booleans())
def test_srpo_shift_is_always_the_renamed_key_hint(method, value, via_set):
    with pytest.raises(ConfigError) as e:
        if via_set:
            build_config({}, [f"method={method}", f"srpo.shift={_fmt(value)}"])
        else:
            build_config({"method": method, "srpo": {"shift": value, "window": [5, 25]}})
    assert str(e.value) == "config key 'srpo.shift' was renamed; use sampling.shift instead"


def test_yaml_no_sets_the_no_choice(tmp_path):
    """YAML 1.1 reads an unquoted ``no`` as false; ``train.mixed_precision: no`` still means the choice "no"."""
    assert build_config({}, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\n", encoding="utf-8")
    assert load_config(f).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="train.mixed_precision"):
        build_config({}, ["train.mixed_precision=yes"])  # not a choice


@settings(max_examples=300, deadline=None)
@given(lo=st.floats(-1e6, 1e6), span=st.floats(1e-6, 1e6))
def test_nice_ticks_cover_the_range(lo, span):
    """Chart axes run from the first tick to the last, so the ticks must cover every value plotted."""
    from directalign.report import nice_ticks

    hi = lo + span
    ticks = nice_ticks(lo, hi)
    assert ticks[0] <= lo + 1e-9 * max(1.0, abs(lo)) and ticks[-1] >= hi - 1e-9 * max(1.0, abs(hi))
    assert 2 <= len(ticks) <= 12 and ticks == sorted(ticks)


def test_nice_ticks_reach_a_value_just_above_a_round_tick():
    """The method comparison's plot lost its top point this way: 0.787 above ticks ending at 0.78."""
    from directalign.report import nice_ticks

    assert nice_ticks(0.7255, 0.787)[-1] >= 0.787
