"""The whole run configuration: the shared sections plus exactly one section for the chosen method.

``method: srpo`` selects :mod:`directalign.methods.srpo` and its ``srpo:`` section; the resolved configuration holds
``method``, ``model``, ``reward``, ``sampling``, the method's section, ``train``, ``eval`` and ``run``, nothing else.
A section of another method is a one-line error naming the method it belongs to; a renamed key is a one-line error
naming its new place. ``directalign train --print-config`` shows the resolved configuration.
"""

from __future__ import annotations

import dataclasses
import logging
from importlib import resources
from pathlib import Path

import yaml

from .adapters.loading import FAMILIES
from .engine.config import (SHARED_SECTIONS, ConfigError, build_section, check_section, deep_merge, flat_diff,
                            load_yaml, parse_override)
from .methods.registry import METHODS, sections
from .rewards.zoo import REWARD_KINDS

DEFAULT_METHOD = "srpo"
# Keys that moved, and where to: a config that still uses one gets a one-line hint.
RENAMED = {"srpo.shift": "sampling.shift"}
TERM_KINDS = tuple(k for k in REWARD_KINDS if k != "sum")
_log = logging.getLogger("directalign")


class Config:
    """A resolved configuration: ``cfg.model``, ``cfg.reward``, ``cfg.sampling``, ``cfg.train``, ``cfg.eval``,
    ``cfg.run`` and the chosen method's section under its own name (``cfg.srpo``, ``cfg.grpo``, ...)."""

    def __init__(self, method: str = DEFAULT_METHOD, sections: dict | None = None):
        if method not in METHODS:
            raise ConfigError(f"method: {method!r} is not allowed; choose one of {', '.join(METHODS)}")
        spec = METHODS[method]
        given = dict(sections or {})
        self.method = method
        self.section_name = spec.section
        self._sections = {}
        for name, cls in list(SHARED_SECTIONS.items())[:3] + [(spec.section, spec.config)] + \
                list(SHARED_SECTIONS.items())[3:]:
            self._sections[name] = given.pop(name, None) or cls()
        if given:
            raise ConfigError(f"method {method} has no section {next(iter(given))!r}")

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        sections_ = self.__dict__.get("_sections", {})
        if name in sections_:
            return sections_[name]
        owners = sections().get(name)
        if owners:
            raise AttributeError(f"this config is for method {self.method}; section {name!r} belongs to "
                                 f"{' / '.join(owners)}")
        raise AttributeError(name)

    def __setattr__(self, name: str, value) -> None:
        # ``cfg.train = ...`` replaces the section itself (else to_dict, == and to_yaml would keep the old one)
        sections_ = self.__dict__.get("_sections")
        if sections_ is not None and name in sections_:
            sections_[name] = value
        elif sections_ is not None and name in sections():
            self.__getattr__(name)  # raises: a section of another method
        else:
            object.__setattr__(self, name, value)

    @property
    def method_section(self):
        return self._sections[self.section_name]

    def section_items(self):
        return list(self._sections.items())

    def to_dict(self) -> dict:
        out: dict = {"method": self.method}
        out.update({name: dataclasses.asdict(sec) for name, sec in self._sections.items()})
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def defaults(self) -> "Config":
        """The default configuration of the same method."""
        return Config(self.method)

    def __eq__(self, other) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Config(method={self.method!r}, ...)"


def _field_choices(cls, prefix: str) -> dict[str, tuple]:
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type if isinstance(f.type, type) else None):
            continue
        if f.metadata.get("choices"):
            out[f"{prefix}.{f.name}"] = tuple(f.metadata["choices"])
    return out


def all_choices() -> dict[str, tuple]:
    """``{"a.b": allowed values}`` of every field with a fixed set of values, in every section of every method,
    plus ``method``, ``model.family`` and ``reward.kind`` (owned by the registries)."""
    out: dict[str, tuple] = {"method": tuple(METHODS), "model.family": tuple(FAMILIES), "reward.kind": REWARD_KINDS}
    for name, cls in SHARED_SECTIONS.items():
        out.update(_field_choices(cls, name))
    for spec in METHODS.values():
        out.update(_field_choices(spec.config, spec.section))
    return dict(sorted(out.items()))


def _check_renamed(data: dict) -> None:
    for old, new in RENAMED.items():
        node = data
        for part in old.split("."):
            if not isinstance(node, dict) or part not in node:
                break
            node = node[part]
        else:
            raise ConfigError(f"config key '{old}' was renamed; use {new} instead")


def _key_paths(cls, prefix: str) -> list[str]:
    """Every settable key of section ``cls`` as ``prefix.key`` (nested sections such as reward.terms included)."""
    import typing

    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        sub = hints.get(f.name)
        nested = isinstance(sub, type) and dataclasses.is_dataclass(sub)
        out += _key_paths(sub, f"{prefix}.{f.name}") if nested else [f"{prefix}.{f.name}"]
    return out


def _homes(key: str, where: str, method: str) -> list[str]:
    """Where else ``key`` is a setting (``model.device`` for ``train.device``), this method's sections first."""
    spec = METHODS[method]
    mine = {**SHARED_SECTIONS, spec.section: spec.config}
    others = {s.section: s.config for s in METHODS.values() if s.section not in mine}
    found = []
    for table, note in ((mine, ""), (others, " (a setting of another method)")):
        for name, cls in table.items():
            found += [p + note for p in _key_paths(cls, name) if p.rsplit(".", 1)[-1] == key and p != where]
    return found


def _check_misplaced(merged: dict, method: str) -> None:
    """An unknown key that is a key of another section gets a hint naming where it lives."""
    spec = METHODS[method]
    allowed = {**SHARED_SECTIONS, spec.section: spec.config}
    for name, value in merged.items():
        if name in allowed and isinstance(value, dict):
            keys = [(f"{name}.{k}", k, v) for k, v in value.items() if isinstance(k, str)
                    and k not in {f.name for f in dataclasses.fields(allowed[name])}]
        elif name not in allowed and isinstance(name, str) and name not in sections():
            keys = [(name, name, value)]
        else:
            continue
        for where, key, v in keys:
            homes = _homes(key, where, method)
            if homes:
                home = homes[0]
                printable = isinstance(v, (int, float)) or (isinstance(v, str) and v.isprintable())
                example = f" (--set {home}={v})" if printable and not home.endswith(")") else ""
                section = home.split(" ")[0].rsplit(".", 1)[0]
                raise ConfigError(f"unknown config key {where!r}; {key} is a key of section {section}: use "
                                  f"{home}{example}")


def validate(cfg: Config) -> None:
    """Check every section (after building, or after code changed a field) and the choices the registries own."""
    for name, section in cfg.section_items():
        check_section(section, name)
    if cfg.model.family not in FAMILIES:
        raise ConfigError(f"model.family: {cfg.model.family!r} is not allowed; choose one of {', '.join(FAMILIES)}")
    if cfg.reward.kind not in REWARD_KINDS:
        raise ConfigError(f"reward.kind: {cfg.reward.kind!r} is not allowed; choose one of {', '.join(REWARD_KINDS)}")
    for kind in cfg.reward.terms.kinds:
        if kind not in TERM_KINDS:
            raise ConfigError(f"reward.terms.kinds: {kind!r} is not allowed; choose from {', '.join(TERM_KINDS)}")


def build_config(data: dict | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- data <- each ``key=value`` override, then validation."""
    merged = dict(data or {})
    for text in overrides or []:
        merged = deep_merge(merged, parse_override(text))
    _check_renamed(merged)
    method = merged.pop("method", DEFAULT_METHOD)
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"method: {method!r} is not allowed; choose one of {', '.join(METHODS)}")
    _check_misplaced(merged, method)  # train.device -> "use model.device"
    spec = METHODS[method]
    allowed = {**SHARED_SECTIONS, spec.section: spec.config}
    owners = sections()
    built = {}
    for name, value in merged.items():
        if name not in allowed:
            if name in owners:
                raise ConfigError(f"section '{name}' belongs to method {' / '.join(owners[name])}, but method is "
                                  f"{method}; remove the section or set method: {owners[name][0]}"
                                  + (f" (a shipped config of {method}: --config tiny-{method})"
                                     if packaged_config(f"tiny-{method}").is_file() else ""))
            raise ConfigError(f"unknown config key {str(name)!r}; allowed keys here: method, {', '.join(allowed)}")
        built[name] = build_section(allowed[name], value, name)
    cfg = Config(method, built)
    validate(cfg)
    return cfg


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("directalign"))) / "configs" / f"{name}.yaml"


def resolve_config_path(value: str | None) -> Path:
    """A path, or the name of a shipped config (``tiny-srpo``, ``flux-dev-srpo-hpsv2``, ...); None: the default."""
    if value is None:
        return packaged_config("tiny-srpo")
    p = Path(value)
    if p.exists() or p.suffix in (".yaml", ".yml"):
        return p
    shipped = packaged_config(value)
    return shipped if shipped.is_file() else p


def load_config(path=None, overrides: list[str] | None = None) -> Config:
    """The YAML file ``path`` plus the ``key=value`` overrides; every key neither sets takes the built-in default,
    which for ``sampling``, ``train`` and the method's section is the FLUX.1-dev setting of the official code, not the
    tiny job's (:mod:`directalign.config_sources` says which key comes from where; ``--print-config`` marks them)."""
    return build_config(load_yaml(path) if path else {}, overrides)


def migrate_run_config(data: dict) -> tuple[dict, list[str]]:
    """A run's saved ``config.yaml`` (as a dict) in today's layout, and one note per change made.

    Runs written before the per-method sections saved every method's section (the chosen one, the others at their
    defaults, where they did nothing) and the schedule shift as ``srpo.shift``. Here the sections of other methods
    are dropped and ``srpo.shift`` becomes ``sampling.shift`` (unless that is set), so ``eval``, ``report``,
    ``load_run`` and ``--resume`` read such a run instead of stopping on a key it could not help holding."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    method = data.get("method", DEFAULT_METHOD)
    if not isinstance(method, str) or method not in METHODS:
        return data, []  # build_config names the problem
    notes = []
    srpo = data.get("srpo")
    if isinstance(srpo, dict) and "shift" in srpo and isinstance(data.setdefault("sampling", {}), dict):
        shift = srpo.pop("shift")
        if "shift" not in data["sampling"]:
            data["sampling"]["shift"] = shift
        notes.append(f"srpo.shift is now sampling.shift (= {data['sampling']['shift']})")
    own = METHODS[method].section
    others = [name for name in sections() if name != own and name in data]
    for name in others:
        del data[name]
    if others:
        notes.append(f"dropped the sections of other methods ({', '.join(others)}): method {method} does not read "
                     "them")
    return data, notes


def load_run_config(path, overrides: list[str] | None = None, log=None) -> Config:
    """The config of a run from its saved ``config.yaml`` at ``path`` (through :func:`migrate_run_config`, each
    change reported to ``log``), plus the ``key=value`` overrides."""
    data, notes = migrate_run_config(load_yaml(path))
    for note in notes:
        (log or _log.warning)(f"{path}: written by an older directalign; {note}")
    return build_config(data, overrides)


def diff_from_defaults(cfg: Config) -> dict:
    """Flattened ``{"a.b": value}`` of every setting that differs from the defaults (for logs and run identity)."""
    out = {} if cfg.method == DEFAULT_METHOD else {"method": cfg.method}
    defaults = cfg.defaults()
    for name, section in cfg.section_items():
        out.update(flat_diff(section, getattr(defaults, name), name + "."))
    return out
