"""The typed-config machinery every command line shares: YAML plus ``--set a.b=value`` overrides, checked into a
tree of dataclasses.

`load_config(path, overrides, schema)` reads a YAML mapping, applies ``a.b=value`` overrides (each value parsed as a
YAML scalar, so ``--set server.port=9000`` is an int and ``--set model.source=null`` is None) and builds ``schema`` (a
dataclass whose fields may be nested dataclasses) from it. Every field is type-checked from its annotation and
range-checked from its `setting(...)` metadata; a dataclass may add cross-field checks in a ``validate(self)`` method
raising `ConfigError.at(...)`. Any problem (unknown section or key, wrong type, out of range, not an allowed choice)
raises one `ConfigError` naming the dotted key, the bad value and what is allowed.

It imports nothing from the package, so the runtime dataclasses of every layer (the scheduler's `StarvationConfig`,
the engine's `EngineConfig`, the trainer's `TrainConfig`) declare their keys with `setting(...)` and serve directly as
config sections: each key has its one default where the code that uses it lives.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem; the message names the dotted key, the bad value and what is allowed."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    @classmethod
    def at(cls, key: str, value: Any, allowed: str) -> ConfigError:
        return cls(f"{key} = {_show(value)} is not allowed: {allowed}", key)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------------------------- field metadata
def setting(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
            ge: float | None = None, gt: float | None = None, le: float | None = None,
            choices: Iterable[Any] | None = None, check: Callable[[Any], str | None] | None = None,
            doc: str = "") -> Any:
    """A dataclass field with validation metadata.

    ``ge``/``gt``/``le`` bound numbers; ``choices`` lists the allowed values; ``check(value)`` returns None when
    the value is fine, else a sentence describing what is allowed. ``doc`` is shown by ``--help-config``.
    """
    meta = {"ge": ge, "gt": gt, "le": le, "choices": tuple(choices) if choices is not None else None,
            "check": check, "doc": doc}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is type(None):
        return "null"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(tp)))
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return f"a list of {_type_name(item)}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping (section)"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


class _Mismatch(Exception):
    """The value does not have the annotated type (internal: turned into a ConfigError by the caller)."""


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """`value` as type `tp`, or raise _Mismatch / ConfigError. Nested dataclasses are built recursively."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise _Mismatch
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except _Mismatch:
                continue
        raise _Mismatch
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    if origin is Literal:
        if any(value == a and type(value) is type(a) for a in typing.get_args(tp)):
            return value
        raise _Mismatch
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise _Mismatch
        out = []
        for i, v in enumerate(value):
            try:
                out.append(_coerce(v, item, f"{key}[{i}]"))
            except _Mismatch:
                raise ConfigError.at(f"{key}[{i}]", v, f"each item must be {_type_name(item)}") from None
        return out
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _Mismatch
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise _Mismatch
        return build_config(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"config schema: unsupported annotation {tp!r} for {key}")


def _check_metadata(value: Any, meta: Mapping[str, Any], key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and not any(value == c and type(value) is type(c) for c in choices):
        raise ConfigError.at(key, value, "must be one of " + ", ".join(map(repr, choices)))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        ge, gt, le = meta.get("ge"), meta.get("gt"), meta.get("le")
        if (ge is not None and value < ge) or (gt is not None and value <= gt) or (le is not None and value > le):
            bounds = [text for bound, text in ((ge, f">= {ge}"), (gt, f"> {gt}"), (le, f"<= {le}"))
                      if bound is not None]
            raise ConfigError.at(key, value, "must be " + " and ".join(bounds))
    if meta.get("check") is not None:
        problem = meta["check"](value)
        if problem:
            raise ConfigError.at(key, value, problem)


def check_settings(obj: Any) -> None:
    """Check each field of dataclass instance ``obj`` against its `setting(...)` metadata (for a dataclass built
    directly in code rather than by `build_config`, which checks every key as it reads it)."""
    for f in dataclasses.fields(obj):
        _check_metadata(getattr(obj, f.name), f.metadata, f.name)


def build_config(schema: type[T], raw: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build dataclass ``schema`` from a mapping, checking every key; missing keys take their defaults."""
    raw = {} if raw is None else raw
    where = prefix or "the config"
    if not isinstance(raw, Mapping):
        raise ConfigError.at(prefix or "<top level>", raw, "must be a mapping of keys to values")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            close = difflib.get_close_matches(str(name), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown key {key!r}{hint}; allowed keys in {where}: {', '.join(fields)}", key)
        f = fields[name]
        try:
            coerced = _coerce(value, hints[name], key)
        except _Mismatch:
            raise ConfigError.at(key, value, f"must be {_type_name(hints[name])}") from None
        _check_metadata(coerced, f.metadata, key)
        kwargs[name] = coerced
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"missing required key {key!r} ({_type_name(hints[name])})", key)
    try:
        obj = schema(**kwargs)
        validate = getattr(obj, "validate", None)
        if callable(validate):
            validate()
    except ConfigError as err:  # from __post_init__ or validate(): name the key from the top of the tree
        if prefix and err.key and not err.key.startswith(prefix + "."):
            full = f"{prefix}.{err.key}"
            raise ConfigError(str(err).replace(err.key, full, 1), full) from None
        raise
    except (TypeError, ValueError) as err:  # a dataclass __post_init__ that raises plain errors
        raise ConfigError(f"{where}: {err}", prefix or None) from None
    return obj


# ----------------------------------------------------------------------------------------------- overrides
def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ("a.b", value parsed as a YAML scalar: 3 -> int, true -> bool, null -> None)."""
    key, sep, raw_value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. --set server.port=9000")
    try:
        value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({err})", key) from None
    return key, value


def apply_overrides(raw: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``raw`` with each ``a.b=value`` override written into it (creating sections as needed)."""
    out: dict[str, Any] = _deep_copy(raw)
    for text in overrides:
        key, value = parse_override(text)
        node = out
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                raise ConfigError(f"--set {text!r}: {where} is a value ({_show(child)}), not a section", key)
            node = child
        node[parts[-1]] = value
    return out


def _deep_copy(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist (give --config PATH to a YAML file)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None, overrides: Iterable[str], schema: type[T],
                prepare: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None) -> T:
    """Read ``path`` (None = only defaults), apply ``overrides`` and build ``schema``; ``prepare`` may rewrite the
    merged mapping first (e.g. resolve relative paths).

    Raises `ConfigError`; its message starts with the file name (or the ``--set``) at fault.
    """
    raw = read_yaml_mapping(path) if path is not None else {}
    overrides = list(overrides)
    merged = apply_overrides(raw, overrides)
    try:
        return build_config(schema, prepare(merged) if prepare else merged)
    except ConfigError as err:
        origin = _origin_of(err.key, overrides, path)
        raise ConfigError(f"{origin}: {err}" if origin else str(err), err.key) from None


def _origin_of(key: str | None, overrides: list[str], path: str | Path | None) -> str:
    if key:
        for text in reversed(overrides):
            set_key = text.partition("=")[0].strip()
            if key == set_key or key.startswith((set_key + ".", set_key + "[")) or set_key.startswith(key + "."):
                return f"--set {text}"
    return str(path) if path is not None else ""


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """The config tree as plain dicts (for printing and logging)."""
    return dataclasses.asdict(cfg)


def describe_schema(schema: type, prefix: str = "") -> list[str]:
    """One line per key: dotted name, type, default and doc (for ``--help-config``)."""
    lines = []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(describe_schema(tp, key))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "<required>")
        doc = f.metadata.get("doc", "")
        if f.metadata.get("choices"):
            doc = (doc + "; " if doc else "") + "one of " + ", ".join(map(str, f.metadata["choices"]))
        lines.append(f"{key} ({_type_name(tp)}, default {default!r}){': ' + doc if doc else ''}")
    return lines
