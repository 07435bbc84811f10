"""The engine's configuration dataclasses, free of JAX so that config parsing stays cheap.

They are the config tree's sections themselves (`ltr_jax.config` builds ``engine`` and ``ranker`` from them), so
each key has its one default here, beside its bounds and meaning:

* `EngineConfig`: the engine's static shapes (slots, context, the compiled length buckets);
* `MeshConfig`: the device mesh the engine's weights and KV cache are split over (``engine.mesh``);
* `RankingConfig`: how the ranking stage and the orchestrator score arrivals (kept and fused passes, their budget,
  arrivals scored per batch boundary).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ltr_jax.config_schema import ConfigError, check_settings, setting
from ltr_jax.models.padding import length_ladder

#: Requests allowed to wait for a slot (the orchestrator's admission limit; ``server.max_queue`` in the config).
DEFAULT_MAX_QUEUE = 256


def power_of_two(value: int) -> str | None:
    """None for a power of two >= 16, else what is allowed (a `setting` check)."""
    return None if value >= 16 and value & (value - 1) == 0 else "must be a power of two >= 16 (e.g. 1024, 2048)"


@dataclass(frozen=True)
class EngineConfig:
    """Static shape of the engine: slots, maximum sequence length and the compiled length buckets."""

    num_slots: int = setting(8, ge=1, le=4096, doc="decode slots (the batch size)")
    max_seq_len: int = setting(2048, check=power_of_two, doc="prompt + output tokens per sequence")
    min_prefill_bucket: int = setting(16, ge=1, doc="smallest compiled prefill length")
    cache_bucket_step: int = setting(64, ge=1, doc="decode KV-cache length granularity: the cache length is a "
                                                   "bucket built from this step, capped at max_seq_len")
    decode_pipeline: bool = setting(True, doc="while no request waits, dispatch each decode step before reading "
                                              "the previous step's tokens, so streaming and scheduling overlap "
                                              "the device step (a request that ends costs one wasted slot-step)")
    prefill_batch: int | None = setting(None, ge=1, le=64, doc="admitted prompts of one length bucket prefilled "
                                        "in one [rows, bucket] call, at most this many (rows padded to a power of "
                                        "two or this; 1 = one prompt per call); null = 4 on a GPU/TPU, 1 on a CPU "
                                        "(where prefill is compute-bound and compiling the batched shapes doubles "
                                        "warm-up)")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` (a ValueError) naming the key when a field is out of range (each field's own range
        is its `setting`'s)."""
        for name in ("num_slots", "max_seq_len", "min_prefill_bucket", "cache_bucket_step", "prefill_batch"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, int)) and not (name == "prefill_batch"
                                                                             and value is None):
                raise ConfigError.at(name, value, "must be an integer")
        check_settings(self)
        if self.min_prefill_bucket > self.max_seq_len:
            raise ConfigError.at("min_prefill_bucket", self.min_prefill_bucket,
                                 f"must be <= engine.max_seq_len ({self.max_seq_len})")

    def prefill_buckets(self) -> list[int]:
        """Every padded prefill length: the one padding ladder (`ltr_jax.models.padding`) up to max_seq_len, the
        same the ranker's passes use, so a prompt's pass and the rest of its prefill share one padding."""
        return length_ladder(self.max_seq_len, self.min_prefill_bucket)

    def prefill_bucket(self, n: int) -> int:
        for b in self.prefill_buckets():
            if n <= b:
                return b
        raise ValueError(f"a sequence of {n} tokens exceeds engine.max_seq_len={self.max_seq_len}")

    def for_backend(self, backend: str) -> EngineConfig:
        """This config with ``prefill_batch`` resolved for ``backend`` (jax.default_backend()) when it is null."""
        if self.prefill_batch is not None:
            return self
        return dataclasses.replace(self, prefill_batch=1 if backend == "cpu" else 4)

    def prefill_rows(self) -> list[int]:
        """Row counts a batched prefill is compiled for: powers of two from 2 up to ``prefill_batch``, then it."""
        if self.prefill_batch is None:
            raise ValueError("prefill_batch is not resolved: use EngineConfig.for_backend first")
        rows, r = [], 2
        while r < self.prefill_batch:
            rows.append(r)
            r *= 2
        return rows + [self.prefill_batch] if self.prefill_batch > 1 else []

    def prefill_row_bucket(self, n: int) -> int:
        """The compiled row count a batch of ``n`` (2..prefill_batch) prompts is padded to."""
        return next(r for r in self.prefill_rows() if n <= r)

    def cache_bucket(self, n: int) -> int:
        """Smallest cache length >= n: multiples of `cache_bucket_step` up to 8 steps, then growing by ~1.5x."""
        step = self.cache_bucket_step
        b = step
        while b < n:
            b = b + step if b < 8 * step else int(b * 1.5) // step * step
        return min(b, self.max_seq_len)


@dataclass(frozen=True)
class MeshConfig:
    """``engine.mesh``: how many devices the model is split over (`ltr_jax.engine.sharding.mesh_for`)."""

    tensor_parallel: int = setting(1, ge=1, doc="devices the weights and KV cache are split over (attention heads "
                                                "and MLP width; the KV cache over KV heads); must divide the "
                                                "model's query and KV heads and MLP width: start-up names the "
                                                "valid degrees. 1 = one device, no mesh. Multi-host: set "
                                                "JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID")


@dataclass(frozen=True)
class RankingConfig:
    """How arrivals are scored: the ranking stage's kept and fused passes, and the orchestrator's pacing."""

    reuse_pass: bool = setting(True, doc="when the ranker's backbone is the served model's own first blocks, keep "
                                         "its pass over each prompt and start that prompt's prefill there "
                                         "(ranking then adds no model compute)")
    state_budget_mb: float = setting(512.0, ge=0, doc="memory for kept ranker passes (hidden state + K/V of "
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
                                             "before their memory mappings fill 75% of Linux's vm.max_map_count and "
                                             "fuses only what it compiled (0 = never: every pass runs on its own at "
                                             "arrival); needs reuse_pass")


@dataclass(frozen=True)
class OnlineLearningConfig:
    """``ranker.online``: retraining the ranker's head on the requests the server finishes (`engine.online`)."""

    enabled: bool = setting(False, doc="retrain the ranker's head in the background on finished requests and swap "
                                       "in a candidate that beats the live head on held-back recent traffic")
    min_new: int = setting(64, ge=1, doc="finished requests since the last round that start a new round (while the "
                                         "buffer is young, fewer: as many as it held at the last round)")
    interval_s: float = setting(120.0, gt=0, doc="a round also starts this long after the last one when at least "
                                                  "one request finished since")
    steps_per_round: int = setting(100, ge=1, doc="optimizer steps of one round (batches of 256 examples), "
                                                  "warm-started from the live head")
    max_train_s: float = setting(20.0, gt=0, doc="wall-clock limit of one round; it ends at steps_per_round or "
                                                 "here, whichever comes first")
    cpu_share: float = setting(0.25, gt=0, le=1, doc="the trainer's duty cycle: after each step of t seconds it "
                                                     "sleeps t * (1 - share) / share, so it computes at most this "
                                                     "share of a round's wall-clock time (a step may use every core)")
    max_train_share: float = setting(0.05, gt=0, le=1, doc="a round waits while the trainer's compute seconds "
                                                          "exceed this share of the seconds since it started")
    buffer_size: int = setting(4096, ge=16, doc="finished requests kept as training examples (pooled features "
                                                "and output length, never prompt text); the oldest are dropped")
    holdout_fraction: float = setting(0.2, gt=0, le=0.9, doc="share of examples (by request-id hash) held back to "
                                                           "judge candidate against live head")
    margin: float = setting(0.01, ge=0, doc="a candidate replaces the live head only when its concordance tau on "
                                            "the held-back examples beats the live head's by more than this")
    fresh_lineage: bool = setting(True, doc="when the server starts from a trained head no round accepted, also "
                                            "train a head from scratch each round until one of its versions beats "
                                            "the live head (a head fitted to other traffic may not adapt to this; "
                                            "doubles training time until then)")
    min_examples: int = setting(32, ge=4, doc="examples needed (training and held-back together) before a round")
    dir: str | None = setting(None, doc="directory of accepted heads, one Orbax export per version; the server "
                                        "starts from the newest valid one (null = keep them in memory only)")
