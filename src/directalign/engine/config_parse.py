"""Reading configuration: typed sections built from YAML mappings and ``--set key=value`` overrides.

A section is a dataclass. Allowed values sit next to each field (``choice("a", "b")``), and a section may define
``validate(self)`` for its own range checks, raising :class:`ConfigError` through :func:`need`. Unknown keys, wrong
types and values outside the allowed set raise :class:`ConfigError` with one line naming the key and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import field
from pathlib import Path

import yaml

from ..errors import UserError


class ConfigError(UserError, ValueError):
    """A user error in a configuration: the message names the key and the fix."""


def need(condition: bool, message: str) -> None:
    """Raise :class:`ConfigError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)


def choice(default: str, *others: str):
    """A string field whose allowed values are ``default`` and ``others`` (checked when the section is built)."""
    return field(default=default, metadata={"choices": (default, *others)})


def choices_of(cls, name: str) -> tuple:
    """The allowed values of field ``name`` of section ``cls`` (empty when any value of its type is allowed)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return tuple(f.metadata.get("choices", ()))
    raise KeyError(name)


_YAML11_FLOAT_GAP = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def coerce(value, tp, key: str, allowed: tuple = ()):
    """Check and convert one value to the annotated type; raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            if option is type(None) and value is None:
                return None
            try:
                return coerce(value, option, key, allowed)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _YAML11_FLOAT_GAP.match(value.strip()):
            # PyYAML (YAML 1.1) reads exponent floats without a dot, such as 1e-3, as strings
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            out = float(value)
        except OverflowError:  # an integer beyond float range
            out = math.inf
        if not math.isfinite(out):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, bool) and ("yes" if value else "no") in allowed:
            return "yes" if value else "no"  # YAML 1.1 reads an unquoted no / yes (train.mixed_precision) as a bool
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def check_section(obj, prefix: str) -> None:
    """Allowed values of every field, then the section's own ``validate`` (nested sections first)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(value):
            check_section(value, key)
        allowed = f.metadata.get("choices")
        if allowed and value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")
    if hasattr(obj, "validate"):
        obj.validate()


def build_section(cls, data, prefix: str):
    """An instance of section ``cls`` from a mapping (missing keys keep their defaults), checked."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"{prefix}." if prefix else ""
        # repr: a key holding a line break still gives a one-line message
        raise ConfigError(f"unknown config key {where + str(unknown[0])!r}; allowed keys here: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, data[name], key)
        else:
            kwargs[name] = coerce(data[name], tp, key, tuple(f.metadata.get("choices", ())))
    obj = cls(**kwargs)
    check_section(obj, prefix)
    return obj


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_override(text: str) -> dict:
    """``"srpo.window=[10,25]"`` -> ``{"srpo": {"window": [10, 25]}}`` (the value is parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set train.steps=100")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: the key is empty or malformed")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: dict = {}
    cur = node
    parts = key.split(".")
    for part in parts[:-1]:
        cur[part] = {}
        cur = cur[part]
    cur[parts[-1]] = value
    return node


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        inside = next((p / n for n in ("config.yaml", "config.yml") if (p / n).is_file()), None)
        raise ConfigError(f"config file {str(p)!r} is a directory; pass a YAML file to --config"
                          + (f" (this one holds {str(inside)!r})" if inside else ""))
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text; save it as UTF-8 YAML") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"config file {str(p)!r} is not valid YAML{where}; fix its syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping of sections (model:, reward:, train:, ...)")
    return data


def flat_diff(a, b, prefix: str = "") -> dict:
    """``{"x.y": value}`` of every field of section ``a`` that differs from section ``b`` (same class)."""
    out: dict = {}
    for f in dataclasses.fields(a):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(va):
            out.update(flat_diff(va, vb, key + "."))
        elif va != vb:
            out[key] = va
    return out
