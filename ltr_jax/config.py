"""Typed configuration: YAML files plus `--set a.b=value` overrides, checked into a tree of dataclasses.

Owns two things:

* the generic core, reused by every command-line tool (serve, benchmarks, training):
  `load_config(path, overrides, schema)` reads a YAML mapping, applies ``a.b=value`` overrides (each value parsed
  as a YAML scalar, so ``--set server.port=9000`` is an int and ``--set model.source=null`` is None) and builds
  ``schema`` (a dataclass whose fields may be nested dataclasses) from it. Every field is type-checked from its
  annotation and range-checked from its `setting(...)` metadata; a section may add cross-field checks in a
  ``validate(self)`` method raising `ConfigError.at(...)`. Any problem (unknown section or key, wrong type, out of
  range, not an allowed choice) raises one `ConfigError` naming the dotted key, the bad value and what is allowed.
* the sections shared by the tools that run the engine (`ModelSection`, `EngineSection`, `SchedulerSection`,
  `RankerSection`, `LoggingSection`) and the server's own tree `ServeConfig` (those plus `ServerSection`).

Importing this module is cheap (no JAX): config errors surface before any heavy import.
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

from ltr_jax.engine.preemption import PREEMPT_MODES
from ltr_jax.scheduler.policies import POLICY_NAMES, make_policy

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "EngineSection",
    "LoggingSection",
    "ModelSection",
    "RankerSection",
    "SchedulerSection",
    "ServeConfig",
    "ServerSection",
    "StarvationSection",
    "apply_overrides",
    "build_config",
    "config_to_dict",
    "load_config",
    "parse_override",
    "setting",
]


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
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:  # a dataclass __post_init__ that raises plain errors
        raise ConfigError(f"{where}: {err}", prefix or None) from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError as err:
            if prefix and err.key and not err.key.startswith(prefix + "."):
                full = f"{prefix}.{err.key}"
                raise ConfigError(str(err).replace(err.key, full, 1), full) from None
            raise
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


def load_config(path: str | Path | None, overrides: Iterable[str] = (), schema: type[T] | None = None) -> T:
    """Read ``path`` (None = only defaults), apply ``overrides`` and build ``schema`` (default `ServeConfig`).

    Raises `ConfigError`; its message starts with the file name when the file is at fault.
    """
    schema = schema or ServeConfig  # type: ignore[assignment]
    raw = read_yaml_mapping(path) if path is not None else {}
    overrides = list(overrides)
    merged = apply_overrides(raw, overrides)
    try:
        return build_config(schema, merged)
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


# ----------------------------------------------------------------------------------------------- sections
def _power_of_two(value: int) -> str | None:
    return None if value >= 16 and value & (value - 1) == 0 else "must be a power of two >= 16 (e.g. 1024, 2048)"


@dataclasses.dataclass
class ModelSection:
    source: str | None = setting(None, doc="null = embedded SmolLM2-135M-Instruct (downloaded once); 'tiny' = "
                                            "a tiny random model for tests; a .gguf file; a Hugging Face directory")
    dtype: str = setting("float32", choices=("float32", "bfloat16"), doc="compute dtype")
    name: str | None = setting(None, doc="model name served by /v1/models (null = the model's own name)")
    seed: int = setting(0, ge=0, doc="weights seed of the 'tiny' random model")


@dataclasses.dataclass
class EngineSection:
    num_slots: int = setting(8, ge=1, le=4096, doc="decode slots (the batch size)")
    max_seq_len: int = setting(2048, check=_power_of_two, doc="prompt + output tokens per sequence")
    min_prefill_bucket: int = setting(16, ge=1, doc="smallest compiled prefill length")
    cache_bucket_step: int = setting(64, ge=1, doc="decode KV-cache length granularity")
    warmup_max_len: int = setting(512, ge=0, doc="compile prefill/decode shapes up to this length before serving "
                                                 "(0 = no warmup)")
    warmup_transitions: bool = setting(True, doc="also compile every insert and cache resize between the warmed "
                                                 "shapes (concurrent traffic then meets no compilation)")
    preempt_mode: str = setting("swap", choices=PREEMPT_MODES, doc="how a preempted request resumes: 'swap' "
                                "keeps its K/V (within swap_budget_mb) and continues where it stopped; 'recompute' "
                                "re-prefills its prompt and every token it produced")
    swap_budget_mb: float = setting(1024.0, ge=0, doc="memory for the K/V of preempted requests (preempt_mode swap); "
                                                      "past it a preempted request recomputes")
    shared_prefix: bool = setting(True, doc="cache the K/V of the chat template's fixed header (default system "
                                            "prompt and user-turn opening): a prompt that starts with it runs only "
                                            "the tokens after it, in its prefill and in the ranker's pass")
    compilation_cache_dir: str | None = setting("default", doc="JAX persistent compilation cache directory; "
                                                               "'default' = <user cache>/jax_cache; null = off")

    def validate(self) -> None:
        if self.min_prefill_bucket > self.max_seq_len:
            raise ConfigError.at("min_prefill_bucket", self.min_prefill_bucket,
                                 f"must be <= engine.max_seq_len ({self.max_seq_len})")

    def to_engine_config(self):
        from ltr_jax.engine.engine import EngineConfig  # lazy: keeps JAX out of config parsing

        return EngineConfig(num_slots=self.num_slots, max_seq_len=self.max_seq_len,
                            min_prefill_bucket=self.min_prefill_bucket, cache_bucket_step=self.cache_bucket_step)


@dataclasses.dataclass
class StarvationSection:
    enabled: bool = setting(True, doc="promote requests that waited too long")
    threshold_s: float = setting(60.0, gt=0, doc="max waiting time (TTFT or inter-token gap) before promotion")
    quantum_s: float = setting(5.0, gt=0, doc="how long a promoted request keeps its priority")
    preempt_past_cap: bool = setting(True, doc="a promoted request may evict a running one even past the policy's "
                                               "max_preemptions (else it waits for a free slot)")
    requeue_after_quantum: bool = setting(True, doc="when a promoted request's quantum ends it is back in rank "
                                                     "order: a better-ranked waiting request may take its slot")


@dataclasses.dataclass
class SchedulerSection:
    policy: str = setting("ltr", choices=POLICY_NAMES, doc="scheduling policy")
    policy_params: dict[str, Any] = dataclasses.field(
        default_factory=dict, metadata={"doc": "policy parameters, e.g. {max_preemptions: 1, margin: 0.0}"})
    starvation: StarvationSection = dataclasses.field(default_factory=StarvationSection)
    max_prefill_tokens: int | None = setting(None, ge=1, doc="prefill token budget per batch boundary "
                                                             "(null = unlimited)")

    def validate(self) -> None:
        try:
            make_policy(self.policy, **self.policy_params)
        except (TypeError, ValueError) as err:
            names = sorted(self.policy_params, key=lambda n: (n in _policy_param_names(self.policy), n))
            culprit = next((n for n in names if n not in _policy_param_names(self.policy) or repr(n) in str(err)
                            or f"{n} " in str(err)), None)
            if culprit is None:
                raise ConfigError.at("policy_params", self.policy_params, str(err)) from None
            raise ConfigError.at(f"policy_params.{culprit}", self.policy_params[culprit], str(err)) from None

    def make_policy(self):
        return make_policy(self.policy, **self.policy_params)

    def starvation_config(self):
        from ltr_jax.scheduler.scheduler import StarvationConfig

        s = self.starvation
        return StarvationConfig(threshold_s=s.threshold_s, quantum_s=s.quantum_s, enabled=s.enabled,
                                preempt_past_cap=s.preempt_past_cap, requeue_after_quantum=s.requeue_after_quantum)


def _policy_param_names(policy: str) -> tuple[str, ...]:
    from ltr_jax.scheduler.policies import policy_parameters

    return policy_parameters(policy)


@dataclasses.dataclass
class RankerSection:
    enabled: bool = setting(True, doc="score prompts with the learned ranker")
    checkpoint: str | None = setting(None, doc="exported ranker directory (null = the packaged SmolLM2 ranker)")
    required: bool = setting(False, doc="refuse to start without a ranker (else: log it and schedule with "
                                        "score 0, i.e. arrival order)")
    max_batch: int = setting(32, ge=1, le=1024, doc="prompts per ranker forward pass")
    reuse_pass: bool = setting(True, doc="when the ranker's backbone is the served model's own first blocks, keep "
                                         "its pass over each prompt and start that prompt's prefill there "
                                         "(ranking then adds no model compute)")
    state_budget_mb: float = setting(1024.0, ge=0, doc="memory for kept ranker passes (hidden state + K/V of "
                                                       "the backbone blocks); past it, the last-ranked requests "
                                                       "drop theirs and prefill in full")
    score_per_boundary: int | None = setting(32, ge=1, doc="arrivals scored per batch boundary, oldest first "
                                                           "(null = every arrival at once): a burst is ranked over "
                                                           "several boundaries while the running requests decode, "
                                                           "instead of stalling them for all of its ranker passes")
    fuse_max_len: int = setting(0, ge=0, doc="while every slot is busy, run a waiting prompt's ranker pass inside the "
                                             "next decode step (sharing its weight reads) when the prompt has at "
                                             "most this many tokens after the shared prefix; those steps are "
                                             "compiled at warm-up, one per length and cache length; warm-up stops "
                                             "before their memory mappings fill 75% "
                                             "of Linux's vm.max_map_count and fuses only what it compiled (0 = "
                                             "never: every pass runs on its own at arrival); needs reuse_pass")


@dataclasses.dataclass
class ServerSection:
    host: str = setting("127.0.0.1", doc="interface to listen on (0.0.0.0 = all)")
    port: int = setting(8000, ge=0, le=65535, doc="TCP port (0 = any free port)")
    max_queue: int = setting(256, ge=1, doc="requests allowed to wait for a slot; more get HTTP 429")
    request_timeout_s: float | None = setting(600.0, gt=0, doc="per-request deadline (null = none)")
    api_key: str | None = setting(None, doc="bearer token clients must send (null = $LTR_JAX_API_KEY if set, "
                                            "else no authentication)")
    drain_timeout_s: float = setting(30.0, ge=0, doc="on SIGTERM/SIGINT: how long in-flight requests may finish")
    default_max_tokens: int = setting(256, ge=1, doc="max_tokens when a request does not say")
    retry_after_s: int = setting(1, ge=1, doc="Retry-After header value on HTTP 429")


@dataclasses.dataclass
class LoggingSection:
    level: str = setting("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    access_log: bool = setting(False, doc="log every HTTP request (uvicorn access log)")


SERVABLE_POLICIES = tuple(p for p in POLICY_NAMES if not p.startswith("oracle"))


@dataclasses.dataclass
class ServeConfig:
    """`python -m ltr_jax.serve` configuration (see configs/serve_smollm2.yaml)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    engine: EngineSection = dataclasses.field(default_factory=EngineSection)
    scheduler: SchedulerSection = dataclasses.field(default_factory=SchedulerSection)
    ranker: RankerSection = dataclasses.field(default_factory=RankerSection)
    server: ServerSection = dataclasses.field(default_factory=ServerSection)
    logging: LoggingSection = dataclasses.field(default_factory=LoggingSection)

    def validate(self) -> None:
        if self.scheduler.policy not in SERVABLE_POLICIES:
            raise ConfigError.at("scheduler.policy", self.scheduler.policy,
                                 "oracle policies need true output lengths and only run in benchmarks; "
                                 "choose one of " + ", ".join(SERVABLE_POLICIES))
        if self.scheduler.policy == "classify" and not self.ranker.enabled:
            raise ConfigError.at("ranker.enabled", False, "the 'classify' policy needs a classifier ranker; "
                                                          "enable the ranker or choose another policy")
        if self.server.default_max_tokens >= self.engine.max_seq_len:
            raise ConfigError.at("server.default_max_tokens", self.server.default_max_tokens,
                                 f"must be < engine.max_seq_len ({self.engine.max_seq_len})")
