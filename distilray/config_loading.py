"""Reading configs: a YAML file plus `key=value` overrides into a frozen dataclass, with unknown keys,
wrong types and choices outside a `Literal` reported by name; and the one rule for artifact cache keys.

Keys address nested sections with dots (`optim.lr=3e-4`). A key that is not a field of the command
but is a field of exactly one of its sections is taken as that section's (`lr=3e-4`, `dataset=x`):
the commonest keys read better flat. `LEGACY_KEYS` maps a few older flat names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from distilray.errors import DistilrayError

C = TypeVar("C")

# older flat names that a section field now holds under a shorter name
LEGACY_KEYS = {"checkpoint_every": "every", "keep_checkpoints": "keep"}


class Config:
    """Base of every frozen config: `Literal` choices are checked however the config is built."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                check_choice(f.name, getattr(self, f.name), typing.get_args(hints[f.name]), f.metadata.get("hint", ""))


def check_choice(key: str, value: Any, allowed: tuple, hint: str = "") -> None:
    if value not in allowed:
        raise DistilrayError(
            f"{key} must be one of {', '.join(map(str, allowed))}; got {value!r}" + (f" ({hint})" if hint else "")
        )


def choice(default: str, hint: str) -> Any:
    """A `Literal` field whose error, when the value is not a choice, adds `hint`."""
    return dataclasses.field(default=default, metadata={"hint": hint})


def run_only(default: Any) -> Any:
    """A field that changes how a run goes (where, how fast), never what it produces: not in the cache key."""
    return dataclasses.field(default=default, metadata={"run_only": True})


def load_config(cls: type[C], path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Build `cls` from an optional YAML file, then `key=value` overrides (dotted keys for nesting)."""
    values: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise DistilrayError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise DistilrayError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise DistilrayError(f"config file {path} must hold a mapping of keys to values")
        values = _flatten(loaded)
    for item in overrides:
        if "=" not in item:
            raise DistilrayError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        values[key.strip()] = _parse_scalar(raw)
    return config_from(cls, **values)


def config_from(cls: type[C], **values: Any) -> C:
    """Build `cls` from keyword values: plain, dotted (`**{"optim.lr": 1e-3}`) or section shorthand (`lr=1e-3`).

    Values are checked and converted as file values are; this is how code builds a command's config."""
    resolved: dict[str, Any] = {}
    for key, value in values.items():
        resolved[resolve_key(cls, key)] = value
    return _build(cls, resolved, prefix="")


def replace_keys(cfg: C, **values: Any) -> C:
    """`dataclasses.replace` that takes dotted or shorthand keys: `replace_keys(cfg, lr=1e-3, steps=5)`."""
    grouped: dict[str, Any] = {}
    for key, value in values.items():
        head, _, rest = resolve_key(type(cfg), key).partition(".")
        if rest:
            grouped.setdefault(head, {})[rest] = value
        else:
            grouped[head] = value
    for head, value in grouped.items():
        section = getattr(cfg, head, None)
        if dataclasses.is_dataclass(section) and isinstance(value, dict):
            grouped[head] = replace_keys(section, **value)
    try:
        return dataclasses.replace(cfg, **grouped)
    except TypeError as e:
        raise DistilrayError(f"bad config for {type(cfg).__name__}: {e}") from None


def resolve_key(cls: type, key: str) -> str:
    """The full dotted key for `key`: itself, or `section.key` when exactly one section has that field."""
    top = key.split(".", 1)[0]
    names = {f.name for f in dataclasses.fields(cls)}
    if top in names or "." in key:
        return key
    hints = typing.get_type_hints(cls)
    owners = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            inner = {g.name for g in dataclasses.fields(hint)}
            name = key if key in inner else LEGACY_KEYS.get(key, "")
            if name in inner:
                owners.append(f"{f.name}.{name}")
    return owners[0] if len(owners) == 1 else key


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def cache_key_fields(cfg: Any) -> dict[str, Any]:
    """The fields that decide what a run produces: every field except run-only ones and run-only sections
    (a section class with `RUN_ONLY = True`: scale and checkpointing never change the result)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("run_only") or getattr(type(value), "RUN_ONLY", False):
            continue
        out[f.name] = cache_key_fields(value) if dataclasses.is_dataclass(value) else value
    return out


def config_hash(cfg: Any, exclude: tuple[str, ...] = ()) -> str:
    """Short stable hash of a config's result-relevant fields (see `cache_key_fields`; `exclude` drops more)."""
    d = {k: v for k, v in cache_key_fields(cfg).items() if k not in exclude}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def all_keys(cls: type, prefix: str = "") -> list[str]:
    """Every settable key of a config class, sections dotted."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += all_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _build(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key in list(values):
        if not key.startswith(prefix):
            continue
        name, dot, _ = key[len(prefix) :].partition(".")
        if name not in fields or (dot and not dataclasses.is_dataclass(hints[name])):
            known = ", ".join(sorted(all_keys(cls, prefix)))
            raise DistilrayError(f"unknown config key {key!r} for {cls.__name__}; known keys: {known}")
    for name in fields:
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if isinstance(values.get(f"{prefix}{name}"), hint):  # a whole section object, built in code
                kwargs[name] = values[f"{prefix}{name}"]
                continue
            sub = {k: v for k, v in values.items() if k.startswith(f"{prefix}{name}.")}
            if f"{prefix}{name}" in values:
                raise DistilrayError(f"config key {prefix}{name!r} is a section; set {prefix}{name}.<key> instead")
            if sub:
                # start from this command's own default section (its lr, warm-up, ...), not the section class's
                default = _field_default(fields[name])
                base = _flatten(dataclasses.asdict(default), f"{prefix}{name}.") if default is not None else {}
                kwargs[name] = _build(hint, {**base, **sub}, f"{prefix}{name}.")
        elif f"{prefix}{name}" in values:
            kwargs[name] = _coerce(f"{prefix}{name}", values[f"{prefix}{name}"], hint)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise DistilrayError(f"bad config for {cls.__name__}: {e}") from None


def _field_default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        if isinstance(value, bool) and str(value).lower() in args:  # YAML reads `true` as a boolean
            value = str(value).lower()
        return value  # Config.__post_init__ checks the choice, with the field's hint
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        last_error: DistilrayError | None = None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except DistilrayError as e:
                last_error = e
        raise last_error or DistilrayError(f"config key {key!r}: bad value {value!r}")
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        inner = args[0] if args else str
        return tuple(_coerce(key, v, inner) for v in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise DistilrayError(f"config key {key!r} expects true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise DistilrayError(f"config key {key!r} expects an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise DistilrayError(f"config key {key!r} expects a number, got {value!r}")
    if hint is str:
        if isinstance(value, (dict, list)):
            raise DistilrayError(f"config key {key!r} expects a string, got {value!r}")
        return "" if value is None else str(value)
    return value
