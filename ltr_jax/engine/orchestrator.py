"""The continuous-batching driver loop: scheduler decisions in, engine calls out, tokens streamed to consumers.

Owns the one thread that touches the engine. At every batch boundary it:

1. takes cancellations and new submissions from a thread-safe inbox and has the ranking stage
   (`ltr_jax.engine.ranking.RankingStage`) score the oldest unscored arrivals (all of them, or at most
   ``score_per_boundary``, so a burst is ranked over several boundaries while the running requests keep decoding;
   the scheduler sees a request once it is scored);
2. expires requests past their deadline;
3. asks the scheduler (`schedule(now)`) which running requests to evict and which waiting ones to admit;
4. evicts, prefills + inserts admitted requests (from the ranking stage's kept pass when it has one; the others
   of one length bucket together, ``engine.prefill_batch`` per call), emitting the token each prefill yields.
   An evicted request's tokens stay on the host; with ``preempt_mode="swap"`` (default) its K/V is copied out of
   the slot too (`Engine.swap_out`, within a memory budget) and its resume is a plain insert that continues
   where it stopped; otherwise (``"recompute"``, or past the budget) its resume re-prefills its prompt plus
   everything it generated;
5. runs one `generate` step over all slots and streams each running request's token and detokenized text. While
   every slot is busy no arrival could start anyway, so when the ranking stage can, the oldest unscored arrival's
   pass rides on this step (`RankingStage.generate_fused`) and is scored after it.

The scheduler module stays free of JAX: it only ever sees `Request` records. Any policy object works here.
An exception while serving one request finishes that request with `finish_reason="error"`; the loop goes on.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ltr_jax.engine.engine import Engine, SlotSampling
from ltr_jax.engine.preemption import PREEMPT_MODES, PreemptionConfig
from ltr_jax.engine.ranking import NoRanking, RankingStage
from ltr_jax.engine.settings import DEFAULT_MAX_QUEUE, RankingConfig
from ltr_jax.scheduler.request import Request
from ltr_jax.scheduler.scheduler import Scheduler

log = logging.getLogger(__name__)


#: Sampling limits, the one place both the engine loop and the HTTP layer check against (OpenAI's range).
MAX_TEMPERATURE = 2.0
SEED_LIMIT = 2**32


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def validate(self, max_tokens_limit: int) -> None:
        """Raise ValueError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= max_tokens_limit:
            raise ValueError(f"max_tokens must be an integer in [1, {max_tokens_limit}], got {self.max_tokens!r}")
        if not 0.0 <= float(self.temperature) <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE}], got {self.temperature!r}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < SEED_LIMIT):
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")


@dataclass
class StreamEvent:
    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "timeout" | "error"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_generated: int = 0


class QueueFullError(Exception):
    """The admission queue is at its bound; retry later (HTTP 429)."""


class ShuttingDownError(Exception):
    """The orchestrator is draining or stopped and takes no new requests (HTTP 503)."""


@dataclass(eq=False)
class _Generation:
    """Host-side state of one request: its tokens, streaming decoder, consumer and slot."""

    request: Request
    prompt_tokens: list[int]
    sampling: SamplingParams
    seed: int
    on_event: Callable[[StreamEvent], None]
    deadline: float | None
    stop_ids: frozenset[int]
    decoder: Any
    output: list[int] = field(default_factory=list)
    text: str = ""
    held: str = ""  # decoded text withheld because it could be the start of a stop string
    slot: int | None = None
    done: bool = False
    swapped: Any = None  # the K/V of its slot when it was preempted (`Prefix`), until it resumes
    ended_by_model: bool = False  # it emitted a stop token: its length is exact (any other end cuts it short)


class Orchestrator:
    """Continuous batching over an `Engine`, ordered by a `Scheduler`, streaming to per-request callbacks."""

    def __init__(self, engine: Engine, tokenizer, scheduler: Scheduler, ranking: RankingStage | None = None,
                 max_queue: int = DEFAULT_MAX_QUEUE, observer=None, clock: Callable[[], float] = time.monotonic,
                 preempt_mode: str = PreemptionConfig.preempt_mode,
                 swap_budget_mb: float = PreemptionConfig.swap_budget_mb,
                 score_per_boundary: int | None = RankingConfig.score_per_boundary):
        if scheduler.num_slots != engine.num_slots:
            raise ValueError(f"scheduler has {scheduler.num_slots} slots but the engine has {engine.num_slots}")
        if preempt_mode not in PREEMPT_MODES:
            raise ValueError(f"preempt_mode must be one of {', '.join(PREEMPT_MODES)}, got {preempt_mode!r}")
        if not swap_budget_mb >= 0:
            raise ValueError(f"swap_budget_mb must be >= 0 (MiB of K/V kept for preempted requests), got "
                             f"{swap_budget_mb!r}")
        if score_per_boundary is not None and (isinstance(score_per_boundary, bool)
                                               or not isinstance(score_per_boundary, int) or score_per_boundary < 1):
            raise ValueError(f"score_per_boundary must be an int >= 1 (prompts the ranker scores per batch boundary) "
                             f"or None (every arrival at once), got {score_per_boundary!r}")
        self.engine = engine
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.ranking: RankingStage = ranking if ranking is not None else NoRanking()
        self.ranks = ranking is not None
        self.max_queue = max_queue
        self.observer = observer
        self.clock = clock
        self.max_prompt_len = engine.max_seq_len - 2
        self.max_tokens_limit = engine.max_seq_len - 1
        self._lock = threading.Condition()
        self._inbox: list[_Generation] = []
        self._idle_tasks: collections.deque[Callable[[], Any]] = collections.deque()  # `run_when_idle`
        # Arrivals the ranker has not scored yet, oldest first; the scheduler sees a request once it is scored.
        self._unscored: collections.deque[_Generation] = collections.deque()
        self.score_per_boundary = score_per_boundary
        self._cancels: list[str] = []
        self._jobs: dict[str, _Generation] = {}
        self._deadlines: list[tuple[float, int, str]] = []
        self._tie = itertools.count()
        self._free_slots = list(range(engine.num_slots - 1, -1, -1))
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._drain = True
        self._unfinished = 0
        self.preempt_mode = preempt_mode
        self.swap_budget = int(swap_budget_mb * 2**20)
        self.counters: dict[str, float] = {
            "tokens_generated": 0, "requests_finished": 0, "requests_errored": 0, "steps": 0,
            "ranker_seconds": 0.0, "busy_seconds": 0.0,
            "swapped_out": 0, "swapped_in": 0, "recomputed_resumes": 0, "swapped_bytes": 0,
            # steady decode steps (no admission, eviction or ranker pass since the step before): seconds from one
            # step's dispatch to the next's, and of those, seconds blocked reading a step's tokens; the rest is
            # host time (streaming, scheduling, dispatch), hidden behind the device step when pipelined
            "steady_steps": 0, "steady_step_seconds": 0.0, "steady_wait_seconds": 0.0,
        }
        self._last_dispatch: float | None = None  # when the last steady-eligible step was dispatched
        self._waited = 0.0  # seconds blocked reading tokens since that dispatch
        self._unscored_changed = False  # arrivals were scored at this boundary
        # the decode step dispatched and not read yet (``engine.decode_pipeline``), as (tokens on the device, the
        # (job, slot) pairs it ran, when it was dispatched)
        self._inflight: tuple[Any, list[tuple[_Generation, int]], float] | None = None

    # ------------------------------------------------------------------------------------- thread-safe API
    def submit(self, prompt_tokens: list[int], sampling: SamplingParams, on_event: Callable[[StreamEvent], None],
               request_id: str | None = None, timeout_s: float | None = None,
               true_output_len: int | None = None) -> str:
        """Queue a request; returns its id. Raises ValueError for bad input, QueueFullError when full.

        `true_output_len` is for benchmarks only: it lets the oracle policies see the replayed length, and a
        replayed request that reaches it ended where its trace says the model ended (an exact length for online
        learning, though ``max_tokens`` stopped it)."""
        prompt_tokens = [int(t) for t in prompt_tokens]
        if not prompt_tokens:
            raise ValueError("prompt is empty: it must contain at least one token")
        if len(prompt_tokens) > self.max_prompt_len:
            raise ValueError(f"prompt has {len(prompt_tokens)} tokens, more than this server's limit of "
                             f"{self.max_prompt_len}; shorten the prompt")
        sampling.validate(self.max_tokens_limit)
        if timeout_s is not None and not timeout_s > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout_s!r}")
        vocab = self.engine.model_config.vocab_size
        if min(prompt_tokens) < 0 or max(prompt_tokens) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        request_id = request_id or uuid.uuid4().hex
        stop_ids = frozenset(() if sampling.ignore_eos else
                             set(self.tokenizer.stop_token_ids) | set(sampling.stop_token_ids))
        seed = sampling.seed if sampling.seed is not None else int(np.random.default_rng().integers(2**32))
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("the server is shutting down and accepts no new requests")
            if request_id in self._jobs:
                raise ValueError(f"request id {request_id!r} is already in use")
            waiting = self._unfinished - self.scheduler.num_running
            if waiting >= self.max_queue:
                raise QueueFullError(f"admission queue is full ({self.max_queue} waiting requests)")
            now = self.clock()
            req = Request(request_id=request_id, arrival_time=now, prompt_len=len(prompt_tokens),
                          max_tokens=sampling.max_tokens, true_output_len=true_output_len)
            deadline = now + timeout_s if timeout_s else None
            job = _Generation(req, prompt_tokens, sampling, seed, on_event, deadline, stop_ids,
                       self.tokenizer.incremental_decoder())
            req.payload = job
            self._jobs[request_id] = job
            self._inbox.append(job)
            self._unfinished += 1
            self._lock.notify()
        return request_id

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.append(request_id)
            self._lock.notify()

    def run_when_idle(self, tasks: Iterable[Callable[[], Any]]) -> None:
        """Run ``tasks`` one at a time on the loop thread while no request is in the system (e.g. compiling the
        shapes start-up left out). A request arriving during a task waits for that one task, then has the loop; the
        rest resume at the next idle moment. Each task may use the engine as if between batches with no slot busy.
        `stats()['idle_tasks_left']` counts what is left."""
        with self._lock:
            self._idle_tasks.extend(tasks)
            self._lock.notify()

    def _run_one_idle_task(self) -> None:
        with self._lock:
            task = self._idle_tasks[0] if self._idle_tasks else None
        if task is None:
            return
        if self._inflight is not None:  # a pipelined step still unread: read it, so the task finds no step running
            self._collect()
        try:
            task()
        except Exception:  # noqa: BLE001 - idle work is an optimisation: serving goes on without it
            log.error("idle task failed, dropping the rest:\n%s", traceback.format_exc())
            with self._lock:
                self._idle_tasks.clear()
            return
        with self._lock:
            self._idle_tasks.popleft()

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("orchestrator already started")
        self._thread = threading.Thread(target=self._run, name="ltr-jax-orchestrator", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout_s: float | None = None) -> None:
        """Stop taking requests; with drain, finish the in-flight ones first; else cancel them."""
        with self._lock:
            self._stopping = True
            self._drain = drain
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout_s)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            running = self.scheduler.num_running
            return dict(queue_len=self._unfinished - running, running=running,
                        free_slots=self.engine.num_slots - running, num_slots=self.engine.num_slots,
                        idle_tasks_left=len(self._idle_tasks),
                        preemptions=self.scheduler.num_preemptions, promotions=self.scheduler.num_promotions,
                        **self.counters, **self.ranking.counters)

    # ------------------------------------------------------------------------------------------- the loop
    def run_until_idle(self) -> None:
        """Drive the loop on the calling thread until no request is left (benchmarks and tests)."""
        while self._boundary():
            pass

    def _run(self) -> None:
        while True:
            with self._lock:
                idle = not self._inbox and not self._cancels and len(self._jobs) == 0
                if self._stopping and (idle or not self._drain):
                    break
                if idle and not self._idle_tasks:
                    self._lock.wait(timeout=0.1)
            if idle:  # an idle loop is a batch boundary too: a head accepted meanwhile is swapped in
                self.ranking.refresh()
                self._run_one_idle_task()
                continue
            try:
                self._boundary()
            except Exception:  # noqa: BLE001 - the loop must survive; _boundary already failed the culprits
                log.error("orchestrator boundary failed:\n%s", traceback.format_exc())
                time.sleep(0.01)
        if not self._drain:
            self._cancel_everything("cancelled")
        self._fail_unfinished("server stopped")

    def _boundary(self) -> bool:
        """One batch boundary. Returns False when there was nothing to do."""
        t0 = time.perf_counter()  # busy time counts the arrivals' ranker passes too
        self._take_inbox()
        now = self.clock()
        self._expire(now)
        sched = self.scheduler
        if self._inflight is not None and (sched.num_waiting or self._unscored or not sched.num_running):
            self._collect()  # someone may be admitted or evicted: decide on every token produced so far
        if sched.num_waiting == 0 and sched.num_running == 0 and not self._unscored:
            return False
        promotions_before = sched.num_promotions
        decision = sched.schedule(now)
        if self.observer:
            if decision.preempt:
                self.observer.on_preempt(len(decision.preempt))
            if sched.num_promotions > promotions_before:
                self.observer.on_promote(sched.num_promotions - promotions_before)
        if decision.preempt or decision.admit or self._unscored_changed:
            self._last_dispatch = None  # device work between the steps: not a steady interval
        self._unscored_changed = False
        for req in decision.preempt:
            self._evict(req.payload)
        self._admit([req.payload for req in decision.admit])
        if sched.num_running:
            self._step()
        self.counters["busy_seconds"] += time.perf_counter() - t0
        return True

    def _take_inbox(self) -> None:
        with self._lock:
            new, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, []
        for job in new:
            if job.deadline is not None:  # a deadline runs from arrival, scored or not
                heapq.heappush(self._deadlines, (job.deadline, next(self._tie), job.request.request_id))
        for rid in cancels:  # before scoring: no ranker pass for a request nobody waits for
            job = self._jobs.get(rid)
            if job is not None and not job.done:
                self._finish(job, "cancelled", self.clock())
        self._unscored.extend(new)
        self._score_some()

    def _score_some(self) -> None:
        """Score the oldest unscored arrivals, at most ``score_per_boundary`` of them (all with None), and hand them
        to the scheduler. The bound keeps a burst of arrivals from stalling the running requests' decode for the
        whole burst's ranker passes: the rest wait, unscored, for the next boundaries. While every slot is busy, an
        arrival whose pass can ride on a decode step waits for that step instead."""
        if self.ranking.refresh():  # a new head came in: the waiting requests were rescored under it
            self.scheduler.rerank()
        limit = len(self._unscored) if not self.ranks or self.score_per_boundary is None \
            else self.score_per_boundary
        busy = self.scheduler.num_running >= self.engine.num_slots
        batch, deferred = [], []
        while self._unscored and len(batch) < limit:
            job = self._unscored.popleft()
            if job.done:  # cancelled or timed out while it waited to be scored
                continue
            if busy and self.ranking.can_fuse(job.prompt_tokens):
                deferred.append(job)
            else:
                batch.append(job)
        self._unscored.extendleft(reversed(deferred))
        if not batch:
            return
        self._unscored_changed = True
        self._score(batch)
        now = self.clock()
        for job in batch:
            self.scheduler.add(job.request, now)

    def _score(self, jobs: list[_Generation]) -> None:
        if not self.ranks:
            return
        t0 = time.perf_counter()
        try:
            self.ranking.rank([j.request for j in jobs], [j.prompt_tokens for j in jobs])
        except Exception:  # noqa: BLE001 - a ranker failure must not lose requests: they run unranked
            log.error("ranker failed; requests scheduled with score 0:\n%s", traceback.format_exc())
            return
        self._count_ranker_time(time.perf_counter() - t0, len(jobs))

    def _count_ranker_time(self, dt: float, n_jobs: int) -> None:
        """Charge ``dt`` seconds of ranker work on ``n_jobs`` arrivals to the counters and the observer."""
        self.counters["ranker_seconds"] += dt
        if self.observer:
            self.observer.on_ranker(dt, n_jobs)

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, rid = heapq.heappop(self._deadlines)
            job = self._jobs.get(rid)
            if job is not None and not job.done:
                self._finish(job, "timeout", now)

    def _evict(self, job: _Generation) -> None:
        slot, job.slot = job.slot, None
        self._free_slots.append(slot)
        if (self.preempt_mode == "swap"
                and self.counters["swapped_bytes"] + self.engine.swap_out_nbytes(slot) <= self.swap_budget):
            try:
                job.swapped = self.engine.swap_out(slot)
            except Exception:  # noqa: BLE001 - nothing is lost: the request recomputes its context instead
                log.error("swap-out of %s failed; it will recompute:\n%s", job.request.request_id,
                          traceback.format_exc())
            else:
                self.counters["swapped_out"] += 1
                self.counters["swapped_bytes"] += job.swapped.nbytes
                return
        self.engine.free(slot)

    def _release_swap(self, job: _Generation):
        prefix, job.swapped = job.swapped, None
        if prefix is not None:
            self.counters["swapped_bytes"] -= prefix.nbytes
        return prefix

    def _admit(self, jobs: list[_Generation]) -> None:
        """Start the scheduler's admissions, in its order: a swapped-out request resumes with an insert, one with
        a kept ranker pass prefills from it, and the rest prefill together, ``engine.prefill_batch`` at a time, per
        prefill group (shared prefix, length bucket): one device call for a burst of similar prompts."""
        pending: dict[tuple[int, int], list[tuple[_Generation, SlotSampling]]] = {}
        for job in jobs:
            job.slot = self._free_slots.pop()
            if self._resume_swapped(job):
                continue
            s = job.sampling
            sampling = SlotSampling(float(s.temperature), int(s.top_k), float(s.top_p), job.seed)
            try:
                prefix = self.ranking.prefill(job.request, sampling)  # from the ranker's pass over the first blocks
                if prefix is not None:
                    self.engine.insert(prefix, job.slot)
            except Exception as exc:  # noqa: BLE001
                self._prefill_failed(job, exc)
                continue
            if prefix is not None:
                self._on_token(job, int(prefix.token), self.clock())
            else:
                # a resumed request recomputes its whole context (prompt + every token it produced) and, like a
                # new one, gets its next token from the prefill; its key depends only on seed and position, so
                # the token is the one it would have drawn had it never been evicted
                key = self.engine.prefill_group(job.prompt_tokens + job.output)
                pending.setdefault(key, []).append((job, sampling))
        size = self.engine.config.prefill_batch
        for group in pending.values():
            for i in range(0, len(group), size):
                self._prefill_together(group[i:i + size])

    def _resume_swapped(self, job: _Generation) -> bool:
        """Insert a swapped-out request's kept K/V into its slot; False when it has none (or the insert failed:
        it recomputes its context instead)."""
        swapped = self._release_swap(job)
        if swapped is None:
            return False
        try:
            self.engine.insert(swapped, job.slot)
        except Exception:  # noqa: BLE001 - fall back to recomputing the context
            log.error("swap-in of %s failed; recomputing:\n%s", job.request.request_id, traceback.format_exc())
            return False
        self.counters["swapped_in"] += 1
        return True

    def _prefill_together(self, chunk: list[tuple[_Generation, SlotSampling]]) -> None:
        """Prefill these admissions of one prefill group in one call, insert each and emit its first token. When
        the joint call fails, each prefills alone, so that only a request whose own prefill fails is failed."""
        try:
            prefixes = self.engine.prefill_many([job.prompt_tokens + job.output for job, _ in chunk],
                                                [sampling for _, sampling in chunk])
        except Exception as exc:  # noqa: BLE001
            if len(chunk) > 1:
                log.error("a joint prefill of %d requests failed; prefilling them one by one:\n%s", len(chunk),
                          traceback.format_exc())
                for one in chunk:
                    self._prefill_together([one])
                return
            self._prefill_failed(chunk[0][0], exc)
            return
        for (job, _), prefix in zip(chunk, prefixes):
            try:
                self.engine.insert(prefix, job.slot)
            except Exception as exc:  # noqa: BLE001
                self._prefill_failed(job, exc)
                continue
            if job.output:
                self.counters["recomputed_resumes"] += 1
            self._on_token(job, int(prefix.token), self.clock())

    def _prefill_failed(self, job: _Generation, exc: Exception) -> None:
        log.error("prefill failed for %s:\n%s", job.request.request_id, traceback.format_exc())
        self._finish(job, "error", self.clock(), error=f"prefill failed: {exc}")

    def _step(self) -> None:
        """One decode step over the running slots. Pipelined (``engine.decode_pipeline``, while nobody waits and
        no arrival is unscored): the step is dispatched before the previous step's tokens are read and streamed,
        so that host work overlaps the device step (JAX dispatch is asynchronous; the step's input tokens are
        already on the device); a request that ends in the previous step has one token computed for nothing,
        dropped. Otherwise the step is read at once, as the next boundary's decisions need every token."""
        fused = self._next_fused()
        pipelined = fused is None and self.engine.config.decode_pipeline and not self._all_ending()
        previous, self._inflight = self._inflight, None
        if previous is not None and not pipelined:
            self._collect(previous)
            previous = None
            if not self.scheduler.num_running:
                return
        t0 = time.perf_counter()
        try:
            if fused is None:
                new = self.engine.generate()
            else:
                new = self.ranking.generate_fused(fused.request, fused.prompt_tokens)
        except Exception as exc:  # noqa: BLE001 - fail the running requests, keep serving the rest
            log.error("generate failed:\n%s", traceback.format_exc())
            for req in list(self.scheduler.running):
                self._finish(req.payload, "error", self.clock(), error=f"decode step failed: {exc}")
            return
        dispatched = time.perf_counter()
        if self._last_dispatch is not None and fused is None:  # one interval, holding one read of a step
            self.counters["steady_steps"] += 1
            self.counters["steady_step_seconds"] += dispatched - self._last_dispatch
            self.counters["steady_wait_seconds"] += self._waited
        self._last_dispatch = dispatched if fused is None else None
        self._waited = 0.0
        step = (new, [(req.payload, req.payload.slot) for req in self.scheduler.running], t0)
        if pipelined:
            self._inflight = step
            if previous is not None:
                self._collect(previous)
            return
        self._collect(step, before_streaming=None if fused is None else lambda: self._score_fused(fused))

    def _all_ending(self) -> bool:
        """Whether every running request reaches max_tokens with the step in flight (no next step is needed)."""
        if self._inflight is None:
            return False
        return all(len(job.output) + 1 >= job.sampling.max_tokens for job, _ in self._inflight[1])

    def _collect(self, step=None, before_streaming: Callable[[], None] | None = None) -> None:
        """Read a dispatched decode step's tokens (default: the one in flight) and stream each to its request,
        unless the request ended (or was cancelled) while the step ran (``before_streaming`` runs in between)."""
        if step is None:
            step, self._inflight = self._inflight, None
        new, jobs, t0 = step
        t_read = time.perf_counter()
        try:
            tokens = np.asarray(new)
        except Exception as exc:  # noqa: BLE001 - fail the requests of that step, keep serving the rest
            log.error("generate failed:\n%s", traceback.format_exc())
            for job, _ in jobs:
                self._finish(job, "error", self.clock(), error=f"decode step failed: {exc}")
            return
        ready = time.perf_counter()
        self._waited += ready - t_read
        if before_streaming is not None:
            before_streaming()
        now = self.clock()
        self.counters["steps"] += 1
        if self.observer:
            self.observer.on_step(len(jobs), ready - t0, len(jobs))
        for job, slot in jobs:
            if not job.done and job.slot == slot:
                self._on_token(job, int(tokens[slot]), now)

    def _next_fused(self) -> _Generation | None:
        """The oldest arrival waiting to be scored, when this step can run its pass."""
        if not self.ranks:
            return None
        while self._unscored and self._unscored[0].done:
            self._unscored.popleft()
        if not self._unscored or not self.ranking.can_fuse(self._unscored[0].prompt_tokens):
            return None
        return self._unscored[0]

    def _score_fused(self, job: _Generation) -> None:
        """Score an arrival from the pass a decode step ran for it and hand it to the scheduler."""
        self._unscored.remove(job)
        t0 = time.perf_counter()
        try:
            self.ranking.rank_fused(job.request)
        except Exception:  # noqa: BLE001 - as in _score: it runs unranked rather than not at all
            log.error("ranker head failed; request scheduled with score 0:\n%s", traceback.format_exc())
        self._count_ranker_time(time.perf_counter() - t0, 1)
        self.scheduler.add(job.request, self.clock())

    # ------------------------------------------------------------------------------------ per-token work
    def _on_token(self, job: _Generation, token: int, now: float) -> None:
        req = job.request
        first = req.generated == 0
        prev = req.last_token_time
        self.scheduler.on_token(req, now)
        job.output.append(token)
        self.counters["tokens_generated"] += 1
        if self.observer:
            if first:
                self.observer.on_first_token(req.request_id, now - req.arrival_time)
            elif prev is not None:
                self.observer.on_token_gap(now - prev)
        try:
            reason = None
            if token in job.stop_ids:
                reason, delta = "stop", job.decoder.finish()
                job.ended_by_model = True
            else:
                delta = job.decoder.push(token)
                context_full = len(job.prompt_tokens) + len(job.output) >= self.engine.max_seq_len - 1
                if len(job.output) >= job.sampling.max_tokens or context_full:
                    reason = "length"
                    delta += job.decoder.finish()
            if job.sampling.stop and (delta or job.held):
                delta, hit = self._apply_stop_strings(job, delta, final=reason is not None)
                if hit:
                    reason = "stop"
            job.text += delta
            if reason is None:
                self._emit(job, StreamEvent(req.request_id, [token], delta, num_prompt_tokens=len(job.prompt_tokens),
                                            num_generated=len(job.output)))
            else:
                ids = [] if token in job.stop_ids else [token]
                self._finish(job, reason, now, last_ids=ids, last_text=delta)
        except Exception as exc:  # noqa: BLE001
            self._finish(job, "error", now, error=f"detokenization failed: {exc}")

    def _apply_stop_strings(self, job: _Generation, delta: str, final: bool) -> tuple[str, bool]:
        """(text to emit now, whether a stop string was hit). Matching runs over the text not emitted yet; a tail
        that could still grow into a stop string is held back until it cannot (or the request ends), so no part
        of a stop string that spans several tokens is ever streamed."""
        text = job.held + delta
        hits = [i for i in (text.find(s) for s in job.sampling.stop) if i >= 0]
        if hits:
            job.held = ""
            return text[: min(hits)], True
        keep = 0
        if not final:
            for s in job.sampling.stop:
                keep = max([keep] + [k for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])])
        job.held = text[len(text) - keep:] if keep else ""
        return text[: len(text) - keep], False

    def _emit(self, job: _Generation, event: StreamEvent) -> None:
        try:
            job.on_event(event)
        except Exception:  # noqa: BLE001 - a broken consumer cancels its own request only
            log.warning("consumer of %s failed; cancelling it:\n%s", job.request.request_id, traceback.format_exc())
            if not job.done and event.finished is False:
                self._finish(job, "cancelled", self.clock(), notify=False)

    def _finish(self, job: _Generation, reason: str, now: float, error: str | None = None,
                last_ids: list[int] | None = None, last_text: str = "", notify: bool = True) -> None:
        if job.done:
            return
        job.done = True
        req = job.request
        replayed_in_full = req.true_output_len is not None and len(job.output) == req.true_output_len
        self.ranking.finished(req, len(job.output),
                              exact=(job.ended_by_model and reason == "stop") or replayed_in_full)
        self.ranking.forget(req)
        self._release_swap(job)
        if job.slot is not None:
            self.engine.free(job.slot)
            self._free_slots.append(job.slot)
            job.slot = None
        if reason in ("cancelled", "timeout", "error") and req.state.value in ("waiting", "running", "new"):
            self.scheduler.cancel(req.request_id, now)
        else:
            self.scheduler.finish(req, now)
        with self._lock:
            self._jobs.pop(req.request_id, None)
            self._unfinished -= 1
        self.counters["requests_finished"] += 1
        if reason == "error":
            self.counters["requests_errored"] += 1
        if self.observer:
            self.observer.on_finish(req.request_id, reason, len(job.output), now - req.arrival_time)
        if notify:
            self._emit(job, StreamEvent(req.request_id, last_ids or [], last_text, True, reason, error,
                                        len(job.prompt_tokens), len(job.output)))

    def _cancel_everything(self, reason: str) -> None:
        with self._lock:
            pending, self._inbox = self._inbox, []
        for job in pending:
            self.scheduler.add(job.request, self.clock())
        self._unscored.clear()  # still in _jobs: finished below
        for job in list(self._jobs.values()):
            self._finish(job, reason, self.clock())

    def _fail_unfinished(self, message: str) -> None:
        for job in list(self._jobs.values()):
            self._finish(job, "error", self.clock(), error=message)
