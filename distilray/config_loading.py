"""Reading configs: YAML file plus `key=value` overrides into a frozen dataclass, with unknown keys and
wrong types reported by name; and a stable hash of a config for artifact caching."""

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
    return _build(cls, values, prefix="")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Any, exclude: tuple[str, ...] = ()) -> str:
    """Short stable hash of a config's result-relevant fields (keys in `exclude` left out)."""
    d = {k: v for k, v in config_to_dict(cfg).items() if k not in exclude}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


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
        name = key[len(prefix):].split(".", 1)[0]
        if name not in fields:
            known = ", ".join(sorted(_all_keys(cls, prefix)))
            raise DistilrayError(f"unknown config key {key!r} for {cls.__name__}; known keys: {known}")
    for name, f in fields.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            sub = {k: v for k, v in values.items() if k.startswith(f"{prefix}{name}.")}
            if f"{prefix}{name}" in values:
                raise DistilrayError(f"config key {prefix}{name!r} is a section; set {prefix}{name}.<key> instead")
            if sub:
                kwargs[name] = _build(hint, sub, f"{prefix}{name}.")
        elif f"{prefix}{name}" in values:
            kwargs[name] = _coerce(f"{prefix}{name}", values[f"{prefix}{name}"], hint)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise DistilrayError(f"bad config for {cls.__name__}: {e}") from None


def _all_keys(cls: type, prefix: str) -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += [f"{f.name}.{k}" for k in _all_keys(hints[f.name], "")]
        else:
            keys.append(f.name)
    return keys


def _coerce(key: str, value: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
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
