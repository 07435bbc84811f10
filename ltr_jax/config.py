"""The one config tree of the commands that run the engine: `EngineRunConfig` (model, engine, scheduler, ranker),
read by ``bench`` and ``train.label``, and `ServeConfig` (those plus server and logging), read by ``serve``.

The sections are the runtime dataclasses, or extend them with the keys only a command needs, so each key has one
default, declared where the code that uses it lives: ``engine`` is the engine's `EngineConfig` plus the
`PreemptionConfig` (and start-up keys), ``scheduler.starvation`` is the scheduler's `StarvationConfig`, ``ranker`` is
the ranking stage's `RankingConfig` (plus where to load the ranker from). The built-in tree is the default config:
``configs/serve_smollm2.yaml`` lists the same values with comments. YAML and ``--set`` are read by
`ltr_jax.config_schema`. Importing this module is cheap (no JAX): config errors surface before any heavy import.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from ltr_jax import config_schema
from ltr_jax.config_schema import ConfigError, config_to_dict, describe_schema, setting
from ltr_jax.engine.preemption import PreemptionConfig
from ltr_jax.engine.settings import DEFAULT_MAX_QUEUE, EngineConfig, MeshConfig, OnlineLearningConfig, RankingConfig
from ltr_jax.scheduler.policies import POLICY_NAMES, make_policy
from ltr_jax.scheduler.scheduler import StarvationConfig

T = TypeVar("T")

__all__ = [
    "ConfigError",
    "EngineRunConfig",
    "EngineSection",
    "LoggingSection",
    "ModelSection",
    "RankerSection",
    "SchedulerSection",
    "ServeConfig",
    "ServerSection",
    "config_to_dict",
    "describe_schema",
    "load_config",
]


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (), schema: type[T] | None = None) -> T:
    """``path`` (None = the built-in defaults) plus ``overrides`` read into ``schema`` (default `ServeConfig`)."""
    return config_schema.load_config(path, overrides, schema or ServeConfig)


# ----------------------------------------------------------------------------------------------- sections
@dataclasses.dataclass
class ModelSection:
    source: str | None = setting(None, doc="null = embedded SmolLM2-135M-Instruct (downloaded once); 'tiny' = "
                                            "a tiny random model for tests; a .gguf file; a Hugging Face directory")
    dtype: str = setting("auto", choices=("auto", "float32", "bfloat16"),
                         doc="weights, activations and KV cache (norms, softmax and logits accumulate in float32); "
                             "auto = bfloat16 on a GPU/TPU, float32 on a CPU")
    weight_dtype: str = setting("auto", choices=("auto", "float32", "bfloat16"),
                                doc="the weights' dtype when it differs from dtype (matmul inputs are rounded to it, "
                                    "products accumulate in dtype); auto = bfloat16 on a CPU with bfloat16 matrix "
                                    "instructions (AMX, AVX-512 BF16) for engines of 4 or more slots, else dtype")
    name: str | None = setting(None, doc="model name served by /v1/models (null = the model's own name)")
    seed: int = setting(0, ge=0, doc="weights seed of the 'tiny' random model")


@dataclasses.dataclass(frozen=True)
class EngineSection(PreemptionConfig, EngineConfig):
    """The engine's shapes (`EngineConfig`), how preempted requests resume (`PreemptionConfig`) and start-up keys."""

    warmup_max_len: int = setting(128, ge=0, doc="compile prefill/decode/ranker shapes of sequences up to this many "
                                                 "tokens before serving (0 = none)")
    idle_warmup_max_len: int = setting(256, ge=0, doc="after start-up, compile the shapes up to this many tokens one "
                                                      "at a time while no request is in the server (0 = none); "
                                                      "longer ones compile when first needed")
    warmup_transitions: bool = setting(False, doc="also compile every insert and cache resize between the warmed "
                                                  "shapes before serving (concurrent traffic then meets no "
                                                  "compilation; slower start, more memory)")
    shared_prefix: bool = setting(True, doc="cache the K/V of the chat template's fixed header (default system "
                                            "prompt and user-turn opening): a prompt that starts with it runs only "
                                            "the tokens after it, in its prefill and in the ranker's pass")
    compilation_cache_dir: str | None = setting("default", doc="JAX persistent compilation cache directory; "
                                                               "'default' = <user cache>/jax_cache; null = off")
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

    def to_engine_config(self) -> EngineConfig:
        return EngineConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EngineConfig)})


@dataclasses.dataclass
class SchedulerSection:
    policy: str = setting("ltr", choices=POLICY_NAMES, doc="scheduling policy")
    policy_params: dict[str, Any] = dataclasses.field(
        default_factory=dict, metadata={"doc": "policy parameters, e.g. {max_preemptions: 1, margin: 0.0}"})
    starvation: StarvationConfig = dataclasses.field(default_factory=StarvationConfig)
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


def _policy_param_names(policy: str) -> tuple[str, ...]:
    from ltr_jax.scheduler.policies import policy_parameters

    return policy_parameters(policy)


@dataclasses.dataclass(frozen=True)
class RankerSection(RankingConfig):
    """Where the ranker comes from, plus how the ranking stage uses it (`RankingConfig`)."""

    enabled: bool = setting(True, doc="score prompts with the learned ranker")
    checkpoint: str | None = setting(None, doc="exported ranker directory (null = the packaged SmolLM2 ranker)")
    required: bool = setting(False, doc="refuse to start without a ranker (else: log it and schedule with "
                                        "score 0, i.e. arrival order)")
    max_batch: int | None = setting(None, ge=1, le=1024, doc="prompts per ranker forward pass; null = 1 on a CPU "
                                    "(each batch size is another compiled shape per prompt length, compiled when "
                                    "traffic first needs it and resident from then on), 32 on a GPU/TPU")
    online: OnlineLearningConfig = dataclasses.field(default_factory=OnlineLearningConfig)

    def ranker_batch(self, backend: str) -> int:
        """``max_batch`` resolved for ``backend`` (jax.default_backend()) when it is null."""
        return self.max_batch if self.max_batch is not None else (1 if backend == "cpu" else 32)


@dataclasses.dataclass
class ServerSection:
    host: str = setting("127.0.0.1", doc="interface to listen on (0.0.0.0 = all)")
    port: int = setting(8000, ge=0, le=65535, doc="TCP port (0 = any free port)")
    max_queue: int = setting(DEFAULT_MAX_QUEUE, ge=1, doc="requests allowed to wait for a slot; more get HTTP 429")
    request_timeout_s: float | None = setting(600.0, gt=0, doc="per-request deadline (null = none)")
    api_key: str | None = setting(None, doc="bearer token clients must send (null = $LTR_JAX_API_KEY if set, "
                                            "else no authentication)")
    drain_timeout_s: float = setting(30.0, ge=0, doc="on SIGTERM/SIGINT: how long in-flight requests may finish")
    default_max_tokens: int = setting(256, ge=1, doc="max_tokens when a request does not say")
    retry_after_s: int = setting(1, ge=1, doc="Retry-After header value on HTTP 429")
    max_body_mb: float = setting(4.0, gt=0, doc="request bodies larger than this are refused with HTTP 413 before "
                                                 "they are read in full")
    max_messages: int = setting(1024, ge=1, doc="most messages one chat request may carry")
    prompt_special_tokens: bool = setting(False, doc="/v1/completions: special-token text in a prompt string (e.g. "
                                                     "<|im_start|>) becomes the control token; off: it stays text "
                                                     "(chat message content always stays text)")
    allowed_hosts: list[str] | None = setting(None, doc="Host / Origin names accepted (null: on a loopback bind "
                                                        "localhost, 127.0.0.1 and ::1 only, else any; '*' = any); "
                                                        "guards a keyless local server against DNS rebinding and "
                                                        "cross-site requests")
    metrics_require_key: bool = setting(False, doc="/metrics needs the API key too (when one is set)")
    tokenizer_threads: int = setting(2, ge=1, doc="threads that tokenize requests off the event loop")
    max_connections: int = setting(1000, ge=1, doc="open connections at once; more are answered 503 at once")
    body_timeout_s: float = setting(30.0, gt=0, doc="a request body not received in full within this long gets "
                                                 "HTTP 408 (a slow client cannot hold a worker)")
    keep_alive_timeout_s: float = setting(5.0, gt=0, doc="an idle keep-alive connection is closed after this long")
    header_timeout_s: float = setting(10.0, gt=0, doc="a request's headers not received in full within this long "
                                                      "(from the connection, or from its first byte on a kept-alive "
                                                      "one) get HTTP 408 and the connection is closed (slow-loris)")


@dataclasses.dataclass
class LoggingSection:
    level: str = setting("INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    access_log: bool = setting(False, doc="log every HTTP request (uvicorn access log)")


SERVABLE_POLICIES = tuple(p for p in POLICY_NAMES if not p.startswith("oracle"))


@dataclasses.dataclass
class EngineRunConfig:
    """What every command that runs the engine reads: `bench`, `train.label` (and `serve`, which adds more)."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    engine: EngineSection = dataclasses.field(default_factory=EngineSection)
    scheduler: SchedulerSection = dataclasses.field(default_factory=SchedulerSection)
    ranker: RankerSection = dataclasses.field(default_factory=RankerSection)


@dataclasses.dataclass
class ServeConfig(EngineRunConfig):
    """`python -m ltr_jax.serve` configuration (the built-in tree; configs/serve_smollm2.yaml lists it)."""

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
