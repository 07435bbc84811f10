"""The `Scheduler`: which requests hold the batch's slots at each batch boundary.

At every ``schedule(now)`` the candidates are waiting + running requests ordered by ``(promoted first, policy
priority, policy tiebreak, arrival, admission sequence)``; the best ``num_slots`` are kept. Running requests
that fall out are preempted, but only if the policy is preemptive (promotions preempt under any policy), the
victim is under the policy's ``max_preemptions`` cap (the cap counts every preemption; only a promoted newcomer
may go past it, unless ``StarvationConfig.preempt_past_cap`` is off), and the victim is not promoted while the
newcomer is not. Waiting ones that get in are admitted,
optionally under a ``max_prefill_tokens`` budget (the context each admission must prefill; the first admission
of a decision is always allowed so nothing starves behind a long prompt).

Starvation control (wall-clock seconds): a waiting request whose wait since its last token (since arrival
before its first token) exceeds ``threshold_s`` is promoted ahead of every non-promoted request. Its quantum is
``quantum_s`` counted from the moment it became starved (wait start + threshold); once that has passed and it
has produced a token since promotion it is demoted (its wait clock restarts with its next wait). Promoted
requests are ordered among themselves by when they became starved and are never preempted by non-promoted ones.
With ``requeue_after_quantum`` a demoted request that holds its slot through the promotion is back in rank order:
a better-ranked waiting request may take that slot even past the cap (the paper's "promoted for a quantum");
when it is off, a promotion runs the request to its end.
Guarantee (tested in the simulator): with at most 2 x num_slots requests in the system, no prefill budget and
no preemption cap, max_waiting_time <= threshold + quantum + one iteration + one boundary's prefill phase. In
overload no scheduler can bound it (every request needs a token per threshold + quantum).

Data structures, so a decision costs O((admissions + preemptions + promotions) log n + num_slots), not O(n):
waiting requests sit in a sorted list by rank and, for starvation, in a second sorted list by wait-clock start;
running requests (at most ``num_slots``) are scanned. Not thread-safe: call it from one thread (the engine loop).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from ltr_jax.config_schema import setting

from .policies import Policy, make_policy
from .request import Request, RequestState

_PROMOTED = 0
_NORMAL = 1


@dataclass(frozen=True)
class StarvationConfig:
    """Promote a request that waited longer than ``threshold_s`` to the front for ``quantum_s`` seconds (the config
    tree's ``scheduler.starvation`` section)."""

    threshold_s: float = setting(60.0, gt=0, doc="max waiting time (TTFT or inter-token gap) before promotion")
    quantum_s: float = setting(5.0, gt=0, doc="how long a promoted request keeps its priority")
    enabled: bool = setting(True, doc="promote requests that waited too long")
    # Without this, under a cap of 0 a promoted request waits for a slot to free, and in overload the bound slips.
    preempt_past_cap: bool = setting(True, doc="a promoted request may evict a running one even past the policy's "
                                               "max_preemptions (else it waits for a free slot)")
    # Without this a promotion lets a request the ranker put last run to its end ahead of everyone, and the short
    # ones behind it pay (see benchmarks/RESULTS.md, starvation control).
    requeue_after_quantum: bool = setting(True, doc="when a promoted request's quantum ends it is back in rank "
                                                     "order: a better-ranked waiting request may take its slot (it "
                                                     "resumes later)")

    def __post_init__(self) -> None:
        for pname in ("threshold_s", "quantum_s"):
            value = getattr(self, pname)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"StarvationConfig.{pname} must be a finite number > 0 seconds, got {value!r}")


@dataclass
class Decision:
    """What the engine must do at this boundary: evict ``preempt`` from their slots, then prefill ``admit``."""

    preempt: list[Request] = field(default_factory=list)
    admit: list[Request] = field(default_factory=list)


class WaitingView:
    """Read-only view of the waiting queue in scheduling order (best first)."""

    def __init__(self, entries: SortedList) -> None:
        self._entries = entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[Request]:
        return (entry[1] for entry in self._entries)

    def __getitem__(self, index: int) -> Request:
        return self._entries[index][1]

    def __contains__(self, req: object) -> bool:
        return isinstance(req, Request) and req.state is RequestState.WAITING and req._entry in self._entries

    def __bool__(self) -> bool:
        return bool(self._entries)


class Scheduler:
    def __init__(
        self,
        policy: Policy | str,
        num_slots: int,
        starvation: StarvationConfig | None = None,
        max_prefill_tokens: int | None = None,
    ) -> None:
        if isinstance(policy, str):
            policy = make_policy(policy)
        if not isinstance(policy, Policy):
            raise TypeError(f"policy must be a Policy (see make_policy) or a policy name, got {type(policy)!r}")
        if not isinstance(num_slots, int) or num_slots < 1:
            raise ValueError(f"num_slots must be an int >= 1, got {num_slots!r}")
        if max_prefill_tokens is not None and (not isinstance(max_prefill_tokens, int) or max_prefill_tokens < 1):
            raise ValueError(f"max_prefill_tokens must be None or an int >= 1, got {max_prefill_tokens!r}")
        self.policy = policy
        self.num_slots = num_slots
        self.starvation = starvation if starvation is not None and starvation.enabled else None
        self.max_prefill_tokens = max_prefill_tokens
        self.num_preemptions = 0
        self.num_promotions = 0
        self._waiting = SortedList()  # entries (rank, req); rank ends with a unique sequence number
        self._by_wait_start = SortedList()  # entries (wait_clock_start, seq, req), non-promoted waiting only
        self._running: dict[Request, None] = {}
        self._running_promoted: dict[Request, None] = {}
        self._by_id: dict[str, Request] = {}
        self._next_seq = 0
        self._last_now = -math.inf

    # ------------------------------------------------------------------ views
    @property
    def waiting(self) -> WaitingView:
        return WaitingView(self._waiting)

    @property
    def running(self) -> list[Request]:
        return list(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def free_slots(self) -> int:
        return self.num_slots - len(self._running)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    def __len__(self) -> int:
        return len(self._by_id)

    # ------------------------------------------------------------------ ranks
    def _rank(self, req: Request) -> tuple:
        if req.promoted:
            return (_PROMOTED, req._starved_at, req._seq)
        return (_NORMAL, self.policy.priority(req), self.policy.tiebreak(req), req.arrival_time, req._seq)

    def _push_waiting(self, req: Request) -> None:
        req.state = RequestState.WAITING
        req._rank = self._rank(req)
        req._entry = (req._rank, req)
        self._waiting.add(req._entry)
        if self.starvation is not None and not req.promoted:
            req._wait_entry = (req.wait_clock_start, req._seq, req)
            self._by_wait_start.add(req._wait_entry)

    def _pop_waiting(self, req: Request) -> None:
        self._waiting.remove(req._entry)
        req._entry = None
        if req._wait_entry is not None:
            self._by_wait_start.remove(req._wait_entry)
            req._wait_entry = None

    def _rerank_all(self) -> None:
        """Recompute every rank (the policy re-calibrated); one bulk sort instead of n insertions."""
        entries = []
        for _, req in self._waiting:
            req._rank = self._rank(req)
            req._entry = (req._rank, req)
            entries.append(req._entry)
        self._waiting.clear()
        self._waiting.update(entries)
        for req in self._running:
            req._rank = self._rank(req)

    # ------------------------------------------------------------------ API
    def rerank(self) -> None:
        """Re-sort the waiting requests after their scores changed (e.g. a new ranker head rescored them)."""
        self._rerank_all()

    def add(self, req: Request, now: float) -> None:
        """Queue a new request (its TTFT clock runs from ``req.arrival_time``)."""
        if req.state is not RequestState.NEW:
            raise ValueError(f"request {req.request_id!r} was already added (state {req.state.value})")
        if req.request_id in self._by_id:
            raise ValueError(f"duplicate request_id {req.request_id!r}: it is already waiting or running")
        self.policy.on_add(req)
        req._seq = self._next_seq
        self._next_seq += 1
        self._by_id[req.request_id] = req
        self._push_waiting(req)

    def schedule(self, now: float) -> Decision:
        """Decide this boundary's evictions and admissions (and apply them to the queues)."""
        if now < self._last_now:
            raise ValueError(f"schedule(now={now}) went back in time (last call at {self._last_now})")
        self._last_now = now
        if self.starvation is not None:
            self._demote_expired(now)
            self._promote_starved(now)
        decision = Decision()
        waiting = self._waiting
        if not waiting:
            return decision
        budget = self.max_prefill_tokens
        admitted: set[Request] = set()

        # 1) fill free slots, best first
        while len(self._running) < self.num_slots and waiting:
            req = waiting[0][1]
            if budget is not None:
                if admitted and req.context_len > budget:
                    return decision
                budget -= req.context_len
            self._admit(req)
            admitted.add(req)
            decision.admit.append(req)
        if not waiting:
            return decision

        # 2) swap the worst running requests for better waiting ones
        best = waiting[0][1]
        if not (best.promoted or self.policy.preemptive):
            return decision
        limit = self.policy.max_preemptions
        past_cap = best.promoted and self.starvation is not None and self.starvation.preempt_past_cap
        requeue = self.starvation is not None and self.starvation.requeue_after_quantum

        def under_cap(r: Request) -> bool:
            return limit is None or r.preemptions < limit

        def pass_expired(r: Request) -> bool:  # in its slot by a promotion whose quantum is over
            return requeue and r._admitted_promoted and not r.promoted

        victims = [r for r in self._running
                   if (under_cap(r) or pass_expired(r) or (past_cap and not r.promoted)) and r not in admitted]
        if not victims:
            return decision
        if not self._may_displace(best, max(victims, key=_rank_of)):
            return decision
        victims.sort(key=_rank_of, reverse=True)
        preempted: set[Request] = set()
        for victim in victims:
            if not waiting:
                break
            challenger = waiting[0][1]
            if not (challenger.promoted or under_cap(victim) or pass_expired(victim)):
                continue  # past the cap only for a promoted newcomer, or over a request whose promotion expired
            if challenger in preempted or not self._may_displace(challenger, victim):
                break
            if budget is not None:
                if admitted and challenger.context_len > budget:
                    break
                budget -= challenger.context_len
            if not under_cap(victim):
                victim.preemptions_past_cap += 1
            self._preempt(victim)
            preempted.add(victim)
            decision.preempt.append(victim)
            self._admit(challenger)
            admitted.add(challenger)
            decision.admit.append(challenger)
        return decision

    def on_token(self, req: Request, now: float) -> None:
        """One token was produced for running request ``req`` at time ``now``."""
        if req.state is not RequestState.RUNNING:
            raise ValueError(
                f"on_token for request {req.request_id!r} in state {req.state.value}: only running requests "
                "produce tokens"
            )
        req.record_token(now)
        if self.policy.progress_dependent and not req.promoted:
            req._rank = self._rank(req)

    def finish(self, req: Request, now: float) -> None:
        """The request is done (stop token or max_tokens); frees its slot."""
        if req.state is not RequestState.RUNNING:
            raise ValueError(
                f"finish for request {req.request_id!r} in state {req.state.value}: only running requests finish "
                "(use cancel for waiting ones)"
            )
        del self._running[req]
        self._running_promoted.pop(req, None)
        del self._by_id[req.request_id]
        req.state = RequestState.FINISHED
        req.finish_time = now
        if self.policy.on_finish(req):
            self._rerank_all()

    def cancel(self, request_id: str, now: float) -> Request | None:
        """Drop a waiting or running request; returns it (state CANCELLED), or None if unknown or done."""
        req = self._by_id.pop(request_id, None)
        if req is None:
            return None
        if req.state is RequestState.WAITING:
            self._pop_waiting(req)
        else:
            del self._running[req]
            self._running_promoted.pop(req, None)
        req.state = RequestState.CANCELLED
        req.finish_time = now
        return req

    # ------------------------------------------------------------------ internals
    def _may_displace(self, challenger: Request, victim: Request) -> bool:
        if challenger.promoted or victim.promoted:
            # promoted beat non-promoted; among promoted, who starved first wins; non-promoted never win
            return challenger.promoted and challenger._rank < victim._rank
        return self.policy.may_displace(challenger._rank[1], victim._rank[1], challenger, victim)

    def _admit(self, req: Request) -> None:
        self._pop_waiting(req)
        req.state = RequestState.RUNNING
        self._running[req] = None
        req._admitted_promoted = req.promoted
        if req.promoted:
            self._running_promoted[req] = None

    def _preempt(self, req: Request) -> None:
        del self._running[req]
        self._running_promoted.pop(req, None)
        req.preemptions += 1
        self.num_preemptions += 1
        if req.promoted and self._quantum_over(req, self._last_now):
            req.promoted = False
        self._push_waiting(req)

    def _quantum_over(self, req: Request, now: float) -> bool:
        return now >= req._starved_at + self.starvation.quantum_s and req.generated > req._generated_at_promotion

    def _demote_expired(self, now: float) -> None:
        if not self._running_promoted:
            return
        for req in [r for r in self._running_promoted if self._quantum_over(r, now)]:
            del self._running_promoted[req]
            req.promoted = False
            req._rank = self._rank(req)

    def _promote_starved(self, now: float) -> None:
        threshold = self.starvation.threshold_s
        by_wait = self._by_wait_start
        while by_wait and now - by_wait[0][0] > threshold:
            req = by_wait.pop(0)[2]
            req._wait_entry = None
            self._pop_waiting(req)
            req.promoted = True
            req.promotions += 1
            req._starved_at = req.wait_clock_start + threshold
            req._generated_at_promotion = req.generated
            self.num_promotions += 1
            self._push_waiting(req)


def _rank_of(req: Request) -> tuple:
    return req._rank
