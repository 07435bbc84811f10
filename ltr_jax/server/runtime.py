"""From a `ServeConfig` to a running-ready serving stack: model, engine, scheduler, ranker, orchestrator, metrics.

`build_runtime(config)` loads the model (``model.source``: ``"tiny"`` = `tiny_model()`, else
`ltr_jax.models.loading.load_model`), enables JAX's persistent compilation cache, builds the `Engine`, the
`Scheduler` with its policy and starvation control, restores the ranker (the server never trains one: that is
``python -m ltr_jax.train``) and its ranking stage, wires `ServerMetrics` in as the orchestrator's observer, and
compiles the common
shapes (``engine.warmup_max_len``) so the first request is not slow. The orchestrator is returned not yet
started: the HTTP app starts and stops it with its lifespan.

Every failure that a config value causes raises `StartupError` naming that key; the CLI prints it and exits 2.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ltr_jax.config import ModelSection, RankerSection, ServeConfig
from ltr_jax.machine import release_free_memory, resident_mb

log = logging.getLogger(__name__)



class StartupError(RuntimeError):
    """The server cannot start with this configuration; the message names the key and the fix."""


@dataclass
class Runtime:
    """Everything the HTTP layer serves with."""

    config: ServeConfig
    model_name: str
    tokenizer: Any
    engine: Any
    orchestrator: Any
    metrics: Any
    ranker: Any | None
    ranker_note: str
    timings: dict[str, float] = field(default_factory=dict)
    online: Any | None = None  # the online learner (`ltr_jax.engine.online`), started and stopped with the app

    @property
    def effective_policy(self) -> str:
        """The policy in force: with no ranker every score is 0, so a ranking policy serves in arrival order."""
        policy = self.config.scheduler.policy
        return "fcfs" if self.ranker is None and policy in ("ltr", "ltr-rescore") else policy

    @property
    def max_seq_len(self) -> int:
        return self.engine.max_seq_len

    @property
    def max_prompt_len(self) -> int:
        return self.orchestrator.max_prompt_len


def load_serving_model(section: ModelSection, num_slots: int):
    """A `LoadedModel` for ``model.source``, its weights' dtype chosen for an engine of ``num_slots`` slots."""
    from ltr_jax.models.default_model import DefaultModelError
    from ltr_jax.models.loading import CheckpointError, GGUFError, load_model, resolve_weight_dtype

    try:
        weight_dtype = resolve_weight_dtype(section.weight_dtype, section.dtype, num_slots)
        return load_model(section.source, dtype=section.dtype, seed=section.seed, weight_dtype=weight_dtype)
    except (FileNotFoundError, GGUFError, CheckpointError, DefaultModelError, ValueError) as err:
        shown = "null (embedded default)" if section.source is None else repr(section.source)
        raise StartupError(f"model.source = {shown}: cannot load the model: {err}") from None


REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_path(value: str) -> Path:
    """A config path: as given when absolute or present relative to the working directory, else relative to the
    repository root (where the shipped configs' relative paths point)."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.exists() or not (REPO_ROOT / path).exists():
        return path
    return REPO_ROOT / path


def load_ranker(section: RankerSection, policy: str, model) -> tuple[Any | None, str]:
    """(ranker or None, a one-line description of what the scheduler ranks with)."""
    if not section.enabled:
        note = "no ranker (ranker.enabled = false): every request gets score 0"
        if policy in ("ltr", "ltr-rescore"):
            note += f", so policy {policy!r} serves in arrival order"
        log.info(note)
        return None, note
    import jax

    from ltr_jax.models.ranker_checkpoint import RankerCheckpointError, default_ranker_path, load_scorer

    path = resolve_path(section.checkpoint) if section.checkpoint else default_ranker_path()
    if not (path / "ranker.json").is_file():
        train = "train one with `python -m ltr_jax.train --config configs/ranker_smollm2.yaml`"
        if section.required or policy == "classify":
            raise StartupError(
                f"ranker.checkpoint = {str(path)!r}: no exported ranker there (ranker.json missing); {train}"
                + (" (policy 'classify' needs it)" if policy == "classify" else
                   ", or set ranker.required=false to serve without it"))
        note = (f"no ranker: {path} holds no exported ranker, so every request gets score 0 and policy "
                f"{policy!r} serves in arrival order ({train})")
        log.warning(note)
        return None, note
    try:
        scorer = load_scorer(path, model=model, max_batch=section.ranker_batch(jax.default_backend()))
    except RankerCheckpointError as err:
        raise StartupError(f"ranker.checkpoint = {str(path)!r}: {err}") from None
    method = scorer.spec.method
    if policy == "classify":
        if method != "classify":
            raise StartupError(f"scheduler.policy = 'classify' needs a classifier ranker, but {path} holds a "
                               f"{method!r} ranker; choose policy 'ltr' or a classify ranker checkpoint")
        return scorer, f"classifier ranker {path} ({scorer.spec.num_outputs} length buckets)"
    return scorer, f"{method} ranker {path} (first {scorer.spec.n_layers} layers, {scorer.spec.pooling} pooling)"


def start_online_learning(section: RankerSection, ranker):
    """The online learner of ``ranker.online`` (None when off or there is no ranker): the ranker scores with the
    newest valid head accepted in ``ranker.online.dir`` before (the packaged export is never written)."""
    cfg = section.online
    if not cfg.enabled or ranker is None:
        return None
    from ltr_jax.engine.online import OnlineLearner, newest_accepted_head

    if ranker.spec.method == "classify":
        raise StartupError("ranker.online.enabled: online learning retrains score heads (listmle, regression); "
                           f"the ranker is a {ranker.spec.method!r} one: turn it off or serve a listmle ranker")
    version = 0
    restored = newest_accepted_head(resolve_path(cfg.dir) if cfg.dir else None, ranker.spec)
    if restored is not None:
        version, head, _ = restored
        ranker.swap_head(head)
        log.info("online ranker: starting from accepted version %d in %s", version, cfg.dir)
    return OnlineLearner(cfg, ranker.spec, ranker.head, version=version)


def warmup_shapes(engine_config, max_len: int) -> tuple[list[int], list[int]]:
    """(prefill buckets, decode cache lengths) that sequences of up to ``max_len`` tokens use."""
    if max_len <= 0:
        return [], []
    limit = min(max_len, engine_config.max_seq_len)
    prefill = [b for b in engine_config.prefill_buckets() if b <= limit] or [engine_config.prefill_buckets()[0]]
    cache_lens = sorted({engine_config.cache_bucket(n) for n in range(1, limit + 1)})
    return prefill, cache_lens


class WarmupPlan:
    """Which shapes to compile ahead of traffic, in phases with a log line each.

    Before "ready", the shapes a chat request of up to ``engine.warmup_max_len`` tokens meets: the decode steps,
    and either the ranker's pass after the chat template's shared header plus the prefill that continues it (when
    the pass is reused) or the engine's prefills. Afterwards, one shape at a time while the server is idle
    (`Orchestrator.run_when_idle`), the same for sequences up to ``engine.idle_warmup_max_len`` tokens. The rest
    (whole-prompt ranker passes of completions requests, which lack the chat header; full prefills of requests
    whose pass was not kept; inserts and resizes) compiles when a request first needs it, and is then in the
    persistent compilation cache for the next start. On a CPU each compiled 30-block shape holds tens of MB, so
    what is compiled ahead is what a laptop pays in resident memory."""

    def __init__(self, engine, ranker, ranking, shared: int, config: ServeConfig):
        # ``shared``: the cached chat header's length, where a chat prompt's ranker pass starts (0: none cached)
        self.engine, self.ranker, self.ranking, self.shared, self.config = engine, ranker, ranking, shared, config
        self.engine_config = config.engine.to_engine_config()
        self.reuse = ranking is not None and ranking.reuse_pass

    def _ranker_lengths(self, prefill: list[int]) -> list[int]:
        from ltr_jax.models.padding import length_bucket

        if self.ranker is None or not prefill:
            return []
        top = length_bucket(max(prefill), self.ranker.spec.max_prompt_len, self.ranker.min_bucket)
        return [t for t in self.ranker.bucket_lengths() if t <= top]

    def _rank(self, lengths: list[int], starts: list[int], fused=(), cache_lens=()) -> None:
        from ltr_jax.engine.ranking import warmup_ranker

        warmup_ranker(self.engine, self.ranker, lengths, reuse_ranker_pass=self.reuse, fused_shapes=fused,
                      cache_lens=cache_lens, starts=starts)

    def run(self, max_len: int) -> None:
        """Compile the shapes of chat requests up to ``max_len`` tokens now, logging each phase."""
        prefill, cache_lens = warmup_shapes(self.engine_config, max_len)
        if not prefill:
            log.info("warm-up: none (engine.warmup_max_len = 0): every shape compiles when first needed")
            return
        section = self.config.engine
        engine_prefill = [] if self.reuse and not section.warmup_transitions else prefill
        t0 = time.perf_counter()
        log.info("warm-up 1/2: engine, sequences up to %d tokens: decode cache lengths %s%s%s", max_len, cache_lens,
                 f", prefill buckets {engine_prefill}" if engine_prefill else "",
                 ", every insert and resize between them" if section.warmup_transitions else "")
        self.engine.warmup(prefill_buckets=engine_prefill, cache_lens=cache_lens,
                           transitions=section.warmup_transitions,
                           swap=section.preempt_mode == "swap" and section.warmup_transitions)
        log.info("warm-up 1/2: engine done in %.1f s", time.perf_counter() - t0)
        lengths = self._ranker_lengths(prefill)
        if lengths:
            t0 = time.perf_counter()
            fused = [(self.shared, t) for t in lengths if t <= self.config.ranker.fuse_max_len] \
                if self.ranking.fuse_pass else []
            log.info("warm-up 2/2: ranker, prompt lengths %s%s%s", lengths,
                     f" after the chat header ({self.shared} tokens)" if self.shared else "",
                     " and the prefills that continue its pass" if self.reuse else "")
            self._rank(lengths, [self.shared], fused, cache_lens)
            log.info("warm-up 2/2: ranker done in %.1f s", time.perf_counter() - t0)

    def later(self, done_len: int, max_len: int) -> list:
        """Tasks compiling, one shape each, the rest of the shapes up to ``max_len`` tokens (see the class; 0:
        none)."""
        if max_len <= 0:
            return []
        prefill, cache_lens = warmup_shapes(self.engine_config, max(done_len, max_len))
        done_prefill, done_cache = warmup_shapes(self.engine_config, done_len)
        ranker_lengths, done_ranker = self._ranker_lengths(prefill), self._ranker_lengths(done_prefill)
        tasks: list[tuple[str, Any]] = []
        tasks += [(f"decode at cache length {n}", lambda n=n: self.engine.warmup(cache_lens=[n]))
                  for n in cache_lens if n not in done_cache]
        tasks += [(f"ranker pass of {t} tokens", lambda t=t: self._rank([t], [self.shared]))
                  for t in ranker_lengths if t not in done_ranker]
        if not self.reuse:  # the engine's prefills are the chat path
            tasks += [(f"prefill of {b} tokens", lambda b=b: self.engine.warmup(prefill_buckets=[b]))
                      for b in prefill if b not in done_prefill]
        if not tasks:
            return []
        t0 = time.perf_counter()

        def announce():
            log.info("idle warm-up: compiling %d more shapes while no request is in: %s", len(tasks),
                     "; ".join(name for name, _ in tasks))

        def finish():
            release_free_memory()
            log.info("idle warm-up done: %d shapes in %.1f s; resident memory %.0f MB", len(tasks),
                     time.perf_counter() - t0, resident_mb() or 0.0)

        return [announce, *(task for _, task in tasks), finish]


def build_runtime(config: ServeConfig, warmup: bool = True) -> Runtime:
    """Load, wire and (optionally) warm up everything; the orchestrator is not started."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    from ltr_jax.engine.compilation_cache import CompilationCacheError, enable_compilation_cache

    try:
        enable_compilation_cache(config.engine.compilation_cache_dir)
    except CompilationCacheError as err:
        raise StartupError(str(err)) from None
    from ltr_jax.engine.sharding import init_distributed, mesh_for  # lazy: JAX only once the config is good

    init_distributed()  # a multi-host job joins before anything touches a device
    from ltr_jax.engine.engine import Engine
    from ltr_jax.engine.orchestrator import Orchestrator
    from ltr_jax.engine.ranking import make_ranking_stage, share_prefix
    from ltr_jax.models.llama import Llama
    from ltr_jax.scheduler.scheduler import Scheduler
    from ltr_jax.server.metrics import ServerMetrics

    loaded = load_serving_model(config.model, config.engine.num_slots)
    model_name = config.model.name or loaded.config.name
    timings["load_s"] = time.perf_counter() - t0
    log.info("model %s loaded from %s in %.1f s", model_name, loaded.source, timings["load_s"])

    engine_config = config.engine.to_engine_config()
    try:
        mesh = mesh_for(config.engine.mesh, loaded.config)
        engine = Engine(Llama.from_params(loaded.config, loaded.params), engine_config, mesh=mesh)
    except ValueError as err:
        raise StartupError(str(err)) from None
    if mesh is not None:
        log.info("model split over %d devices (engine.mesh.tensor_parallel)", mesh.size)
    sched_cfg = config.scheduler
    scheduler = Scheduler(sched_cfg.make_policy(), engine_config.num_slots, starvation=sched_cfg.starvation,
                          max_prefill_tokens=sched_cfg.max_prefill_tokens)
    if engine.mesh is None:  # the ranker's backbone blocks are the engine's own arrays, not a second copy of them
        loaded = dataclasses.replace(loaded, params=Llama.state_params(engine.params))
    ranker, ranker_note = load_ranker(config.ranker, sched_cfg.policy, loaded)
    if ranker is not None:
        log.info("scheduling: policy %s, %s", sched_cfg.policy, ranker_note)
    shared = share_prefix(loaded.tokenizer.shared_prefix if config.engine.shared_prefix else None, engine, ranker)
    if shared:
        log.info("the chat template's fixed header (%d tokens) is cached: prompts that start with it run only the "
                 "rest", shared)
    metrics = ServerMetrics(model=model_name, policy=sched_cfg.policy)
    online = start_online_learning(config.ranker, ranker)
    ranking = None if ranker is None else make_ranking_stage(
        engine, ranker, reuse_pass=config.ranker.reuse_pass, state_budget_mb=config.ranker.state_budget_mb,
        fuse_pass=config.ranker.fuse_max_len > 0, online=online)
    orchestrator = Orchestrator(engine, loaded.tokenizer, scheduler, ranking=ranking,
                                max_queue=config.server.max_queue, observer=metrics,
                                score_per_boundary=config.ranker.score_per_boundary,
                                preempt_mode=config.engine.preempt_mode, swap_budget_mb=config.engine.swap_budget_mb)
    reuse = ranking is not None and ranking.reuse_pass
    if reuse:
        log.info("the ranker's pass over the first %d blocks is kept and starts each prompt's prefill",
                 ranker.spec.n_layers)
    metrics.attach_stats(orchestrator.stats)

    if warmup:
        plan = WarmupPlan(engine, ranker, ranking, shared, config)
        t1 = time.perf_counter()
        plan.run(config.engine.warmup_max_len)
        timings["warmup_s"] = time.perf_counter() - t1
        release_free_memory()
        timings["resident_mb"] = resident_mb() or 0.0
        log.info("warm-up done in %.1f s; resident memory %.0f MB", timings["warmup_s"], timings["resident_mb"])
        later = plan.later(config.engine.warmup_max_len, config.engine.idle_warmup_max_len)
        if later:
            orchestrator.run_when_idle(later)
    return Runtime(config=config, model_name=model_name, tokenizer=loaded.tokenizer, engine=engine,
                   orchestrator=orchestrator, metrics=metrics, ranker=ranker, ranker_note=ranker_note,
                   timings=timings, online=online)
