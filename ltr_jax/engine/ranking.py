"""The ranking stage: everything about scoring arrivals for the scheduler, behind one small Protocol.

The orchestrator hands it the arrivals to score and asks it three things at batch boundaries: whether the next
decode step can carry an arrival's pass, the prefill of an admitted request when a kept pass can start it, and to
forget a request that left. It never sees the ranker itself. This module owns:

* plain passes: a ranker scores a batch of prompts (`rank`); a classifier's most likely length bucket is set too;
* kept passes: when the ranker's backbone is the served model's own first blocks (`shares_ranker_pass`), each
  prompt's pass (its `BackboneState`) is kept, within a memory budget, and starts its prefill at admission
  (`Engine.prefill_from_state`), so ranking adds no model compute; past the budget the lowest-scored requests
  (the last to run) drop theirs and prefill in full;
* the fused pass: while every slot is busy, an arrival's pass can ride on the next decode step
  (`Engine.generate_with_pass`, only for the shapes warm-up compiled) and the ranker's head scores it afterwards;
* the shared prefix (the chat template's fixed header): engine and ranker cache the same one (`share_prefix`), or
  kept passes are refused;
* warm-up of the ranker's shapes (`warmup_ranker`), within the process's memory-map budget for fused steps.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from ltr_jax.engine.engine import Engine, Prefix, SlotSampling
from ltr_jax.engine.online import OnlineLearner
from ltr_jax.engine.settings import RankingConfig
from ltr_jax.machine import memory_maps
from ltr_jax.models.llama import BackboneState
from ltr_jax.models.padding import length_bucket
from ltr_jax.models.ranker import RankerScorer
from ltr_jax.scheduler.request import Request

log = logging.getLogger(__name__)

COUNTERS = ("ranker_calls", "ranker_requests", "reused_ranker_passes", "ranker_states_dropped",
            "ranker_state_bytes", "fused_ranker_passes", "ranker_version")


class RankingStage(Protocol):
    """What the orchestrator asks of the ranking stage, all on the engine thread at batch boundaries."""

    counters: dict[str, float]

    def rank(self, requests: Sequence[Request], prompts: Sequence[list[int]]) -> None:
        """Set each request's ``score`` (higher = shorter expected output; and ``bucket`` for a classifier)."""

    def can_fuse(self, prompt: list[int]) -> bool:
        """Whether the next decode step can run this waiting prompt's pass (`generate_fused`)."""

    def generate_fused(self, request: Request, prompt: list[int]) -> Any:
        """One decode step over every slot that also runs ``prompt``'s pass; returns the slots' new tokens. The
        request is scored by the next `rank_fused`."""

    def rank_fused(self, request: Request) -> None:
        """Score ``request`` from the pass the last `generate_fused` ran for it."""

    def prefill(self, request: Request, sampling: SlotSampling) -> Prefix | None:
        """The prefill of an admitted request's prompt started from its kept pass, or None when it has none."""

    def forget(self, request: Request) -> None:
        """Drop whatever is kept for ``request`` (it finished, was cancelled, or prefilled in full)."""

    def finished(self, request: Request, generated: int, exact: bool) -> None:
        """``request`` ended after ``generated`` tokens; ``exact``: the model ended it (else its true length is at
        least that: cut by max_tokens, a stop string, a cancel or a deadline)."""

    def refresh(self) -> bool:
        """At a batch boundary: swap in a newly accepted head, if any, and rescore every scored request still
        here under it. True when scores changed (the scheduler must re-sort)."""


def shares_ranker_pass(engine: Engine, ranker: Any) -> bool:
    """Whether ``ranker``'s backbone is the engine's own first blocks, so its pass over a prompt can start that
    prompt's prefill (`Engine.prefill_from_state`). On a mesh too: the ranker runs on one device and the engine
    places its pass on the mesh (replicated) before the rest of the prefill, as its warm-up does."""
    if not isinstance(ranker, RankerScorer):
        return False
    engine_prefix = engine.shared_prefix.tokens if engine.shared_prefix is not None else ()
    if ranker.shared_prefix and ranker.shared_prefix != engine_prefix:  # it would start after a prefix the engine
        return False  # lacks
    n = ranker.spec.n_layers
    if engine.model_config.n_layers < n or engine.model_config.replace(n_layers=n) != ranker.backbone_config:
        return False
    layers = engine.params["layers"]
    return all(np.array_equal(np.asarray(ranker.backbone["layers"][i][key]), np.asarray(layers[i][key][...]))
               for i in {0, n - 1} for key in ("wqkv", "w_down"))


def share_prefix(tokens, engine: Engine, *rankers: Any) -> int:
    """Cache the K/V of ``tokens`` (the chat template's fixed header, `ChatTokenizer.shared_prefix`; empty or None:
    no cache) in the engine and every given ranker, so prompts that start with it run only what follows, in the
    prefill and in the ranker's pass alike. Call before building the stage. Returns the prefix length."""
    n = engine.set_shared_prefix(tokens)
    for ranker in rankers:
        if ranker is not None:
            ranker.set_shared_prefix(tokens)
    return n


def warmup_ranker(engine: Engine, ranker: RankerScorer, lengths: list[int], batch_sizes=(1,),
                  reuse_ranker_pass: bool = True, fused_shapes=(), cache_lens=(), map_budget: float = 0.75,
                  starts: list[int] | None = None) -> float:
    """Compile the ranker for these padded prompt lengths and batch sizes and, when its pass is reused, the engine's
    `prefill_from_state` for the same lengths, ahead of traffic. ``fused_shapes`` ((shared-prefix length, padded
    length) pairs, `RankerScorer.pass_shapes`, most common first) and ``cache_lens``: also the decode steps that run
    a pass (`Engine.generate_with_pass`) for those shapes at those cache lengths; only those are fused later.

    On a CPU each compiled fused step holds a few hundred memory mappings (its kernels' code and data), and a
    process past the kernel's ``vm.max_map_count`` fails its next compile however much memory is free. So the
    fused steps stop before this process would hold more than ``map_budget`` of that limit, judging the next step
    by the largest one compiled so far; the shapes left out run their passes on their own. ``starts``: only prompts
    starting at these positions (0: whole prompts; the shared prefix's length: prompts after it). Returns seconds
    spent."""
    if not 0 < map_budget <= 1:
        raise ValueError(f"map_budget must be in (0, 1], got {map_budget!r}")
    t0 = time.perf_counter()
    reuse = reuse_ranker_pass and shares_ranker_pass(engine, ranker)
    ranker.warmup(batch_sizes=batch_sizes, lengths=lengths, keep_state=reuse, starts=starts)
    if not reuse:
        return time.perf_counter() - t0
    n_layers = ranker.spec.n_layers
    engine.warmup_prefill_from_state(n_layers, lengths, starts=starts)
    todo = [(start, bucket, n) for start, bucket in fused_shapes for n in cache_lens
            if engine.can_run_pass(start, bucket)] if cache_lens else []
    largest, compiled = 0, set()
    for i, (start, bucket, n) in enumerate(todo):
        before = memory_maps()
        if before is not None and largest and before[0] + largest > map_budget * before[1]:
            engine.stats.fused_variants_skipped += len(todo) - i
            log.warning(
                "fused ranker pass: compiled %d of %d decode steps with a pass; the other %d would take this process "
                "past %.0f%% of vm.max_map_count (%d memory mappings held, about %d more each, limit %d), so those "
                "passes run on their own. To fuse more, raise the limit (sysctl -w vm.max_map_count=262144) or fuse "
                "fewer prompt lengths (lower ranker.fuse_max_len).",
                i, len(todo), len(todo) - i, 100 * map_budget, before[0], largest, before[1])
            break
        engine.warmup_generate_with_pass(n_layers, start, bucket, n)
        compiled.add((start, bucket))
        after = memory_maps()
        if before is not None and after is not None:
            largest = max(largest, after[0] - before[0])
    engine.fit_cache()
    ranker.warmup_score_state(sorted(compiled))
    return time.perf_counter() - t0


class NoRanking:
    """The stage without a ranker: every request keeps score 0, so a ranking policy serves in arrival order."""

    def __init__(self) -> None:
        self.counters: dict[str, float] = dict.fromkeys(COUNTERS, 0)

    def rank(self, requests, prompts) -> None:
        return None

    def can_fuse(self, prompt) -> bool:
        return False

    def generate_fused(self, request, prompt):
        raise RuntimeError("no ranker: nothing to fuse")

    def rank_fused(self, request) -> None:
        raise RuntimeError("no ranker: nothing to fuse")

    def prefill(self, request, sampling) -> None:
        return None

    def forget(self, request) -> None:
        return None

    def finished(self, request, generated, exact) -> None:
        return None

    def refresh(self) -> bool:
        return False


class LearnedRanking:
    """The ranking stage over a trained `RankerScorer` (see the module docstring)."""

    def __init__(self, engine: Engine, ranker: RankerScorer, reuse_pass: bool = RankingConfig.reuse_pass,
                 state_budget_mb: float = RankingConfig.state_budget_mb,
                 fuse_pass: bool = RankingConfig.fuse_max_len > 0, online: OnlineLearner | None = None):
        if not state_budget_mb >= 0:
            raise ValueError(f"state_budget_mb must be >= 0 (MiB of kept ranker passes), got {state_budget_mb!r}")
        self.engine = engine
        self.ranker = ranker
        self.reuse_pass = bool(reuse_pass) and shares_ranker_pass(engine, ranker)
        self.fuse_pass = bool(fuse_pass) and self.reuse_pass
        self.state_budget = int(state_budget_mb * 2**20)
        self._counts: dict[str, float] = dict.fromkeys(COUNTERS, 0)
        self._states: dict[str, tuple[Request, BackboneState]] = {}  # request id -> its kept pass
        self._fused: tuple[Request, BackboneState] | None = None  # the pass the last fused step ran
        if online is not None and ranker.spec.method == "classify":
            raise ValueError("online learning retrains score heads (listmle, regression), not a classifier")
        self.online = online  # learns from finished requests: their pooled features are kept until they finish
        self._features: dict[str, tuple[Request, np.ndarray]] = {}
        if online is not None:  # the version the ranker starts from (a restart resumes the newest accepted one)
            self._counts["ranker_version"] = online.version

    @property
    def counters(self) -> dict[str, float]:
        """The stage's counters, with the online learner's (``ranker_version``, ``online_*``) read live."""
        return {**(self.online.stats() if self.online is not None else {}), **self._counts}

    @property
    def version(self) -> int:
        """The version of the head scoring now (0: the one it started with, unless restored from online exports)."""
        return int(self._counts["ranker_version"])

    @property
    def classifies(self) -> bool:
        return self.ranker.spec.method == "classify"

    def rank(self, requests: Sequence[Request], prompts: Sequence[list[int]]) -> None:
        scores, outputs, features, states = self.ranker.raw_with_features(prompts, keep_state=self.reuse_pass)
        self._set_scores(requests, scores, outputs, states, features)
        self._counts["ranker_calls"] += 1
        self._counts["ranker_requests"] += len(requests)

    def _set_scores(self, requests, scores, outputs, states, features) -> None:
        # S3-style: a classifier's most likely length class
        buckets = np.argmax(outputs, axis=-1) if self.classifies else None
        for i, req in enumerate(requests):
            req.score = float(scores[i])
            if self.online is not None:
                self._features[req.request_id] = (req, np.asarray(features[i]))
            if buckets is not None:
                req.bucket = int(buckets[i])
            if states[i] is not None:
                self._keep(req, states[i])
        self._trim()

    def _keep(self, req: Request, state: BackboneState) -> None:
        self.forget(req)
        self._states[req.request_id] = (req, state)
        self._counts["ranker_state_bytes"] += state.nbytes

    def _trim(self) -> None:
        """Keep the passes within budget: drop those of the lowest-scored (last to run) requests first; they
        simply prefill from the first block when admitted."""
        if self._counts["ranker_state_bytes"] <= self.state_budget:
            return
        for req, _ in sorted(self._states.values(), key=lambda kept: kept[0].score):
            self.forget(req)
            self._counts["ranker_states_dropped"] += 1
            if self._counts["ranker_state_bytes"] <= self.state_budget:
                return

    def keeps_pass(self, request: Request) -> bool:
        """Whether a pass over ``request``'s prompt is kept for its prefill."""
        return request.request_id in self._states

    def forget(self, request: Request) -> None:
        kept = self._states.pop(request.request_id, None)
        if kept is not None:
            self._counts["ranker_state_bytes"] -= kept[1].nbytes

    def prefill(self, request: Request, sampling: SlotSampling) -> Prefix | None:
        kept = self._states.get(request.request_id)
        if kept is None:
            return None
        self.forget(request)
        if request.generated:  # a resumed request's context is more than the prompt this pass covered
            return None
        prefix = self.engine.prefill_from_state(kept[1], sampling)
        self._counts["reused_ranker_passes"] += 1
        return prefix

    # ---------------------------------------------------------------------------------------------- fused pass
    def _fused_bucket(self, prompt: list[int]) -> int | None:
        """The padded length of ``prompt``'s pass when a decode step can run it (that step compiled), else None."""
        ranker = self.ranker
        if not self.fuse_pass or len(prompt) > ranker.spec.max_prompt_len:  # a cut prompt's pass is not its
            return None  # prefill's start
        start = self.engine.shared_prefix_len(prompt)
        if start and ranker.shared_prefix != self.engine.shared_prefix.tokens:  # the head could not score a pass
            return None  # that continues a prefix the ranker does not cache
        bucket = length_bucket(len(prompt) - start, ranker.spec.max_prompt_len, ranker.min_bucket)
        return bucket if self.engine.pass_compiled(prompt, ranker.spec.n_layers, bucket) else None

    def can_fuse(self, prompt: list[int]) -> bool:
        return self._fused_bucket(prompt) is not None

    def generate_fused(self, request: Request, prompt: list[int]):
        bucket = self._fused_bucket(prompt)
        if bucket is None:
            raise ValueError(f"the pass of {request.request_id} cannot ride on this decode step (not compiled)")
        tokens, state = self.engine.generate_with_pass(prompt, self.ranker.spec.n_layers, bucket)
        self._fused = (request, state)
        return tokens

    def rank_fused(self, request: Request) -> None:
        if self._fused is None or self._fused[0] is not request:
            raise ValueError(f"no fused pass was run for {request.request_id}")
        _, state = self._fused
        self._fused = None
        self._counts["fused_ranker_passes"] += 1
        score, outputs, features = self.ranker.score_state_with_features(state)
        self._set_scores([request], [score], np.asarray(outputs)[None], [state], np.asarray(features)[None])

    # ---------------------------------------------------------------------------------------------- online
    def finished(self, request: Request, generated: int, exact: bool) -> None:
        kept = self._features.pop(request.request_id, None)
        if kept is not None and self.online is not None and generated > 0:
            self.online.observe(request.request_id, kept[1], request.score, generated, censored=not exact)

    def refresh(self) -> bool:
        accepted = self.online.take_accepted() if self.online is not None else None
        if accepted is None:
            return False
        version, head = accepted
        self.ranker.swap_head(head)
        self._counts["ranker_version"] = version
        if self._features:  # every request still here is ordered by the new head: rescored from its features
            kept = list(self._features.values())
            scores = self.ranker.score_features(np.stack([f for _, f in kept]))
            for (req, _), score in zip(kept, scores):
                req.score = float(score)
        return True


def make_ranking_stage(engine: Engine, ranker: RankerScorer | None, reuse_pass: bool = RankingConfig.reuse_pass,
                       state_budget_mb: float = RankingConfig.state_budget_mb,
                       fuse_pass: bool = RankingConfig.fuse_max_len > 0,
                       online: OnlineLearner | None = None) -> RankingStage:
    """The stage for ``ranker`` (None: `NoRanking`); ``online`` retrains its head from finished requests."""
    if ranker is None:
        return NoRanking()
    return LearnedRanking(engine, ranker, reuse_pass=reuse_pass, state_budget_mb=state_budget_mb,
                          fuse_pass=fuse_pass, online=online)
