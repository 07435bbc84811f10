"""The `Scheduler`: which requests hold the batch's slots at each batch boundary.

At every ``schedule(now)`` the candidates are waiting + running requests ordered by ``(promoted first, policy
priority, policy tiebreak, arrival, admission sequence)``; the best ``num_slots`` are kept. Running requests
that fall out are preempted, but only if the policy is preemptive (promotions preempt under any policy), the
victim is under the policy's ``max_preemptions`` cap (the cap counts every preemption; only a promoted newcomer
may go past it, unless ``StarvationConfig.preempt_past_cap`` is off), and the victim is not promoted while the
newcomer is not. Waiting ones that get in are admitted,
optionally under a ``max_prefill_tokens`` budget (the context each admission must prefill; the first admission
of a decision is always allowed so nothing starves behind a long prompt).

Starvation control (`ltr_jax.scheduler.starvation` states both rules and their promises). Under the default
``fcfs-slack`` rule the scheduler also keeps what each request has cost the engine, from the intervals between its
calls: the interval that ends with a request's ``add`` is its ranker pass (engine time, but no request's cost: FCFS
would not rank), one that ends with its first token after admission is its prefill, and one that ends with a token of
a request that was already running is a decode step, a 1/num_slots share of it to each running request. It hands the
cost model (`WorkModel`) each request as it starts and, every ``_REFRESH_EVERY`` finishes, what each started one has
cost or had so far. From the model and the requests' scores it estimates FCFS's delay (`fcfs_delay_s`) and promotes a
waiting request once its wait exceeds the largest delay since the oldest waiting request began to wait plus the slack
less its reserve (`promotion_wait_s`). Under the ``threshold`` rule (wall-clock seconds) a waiting request whose wait
since its last token (since arrival before its first token) exceeds ``threshold_s`` is promoted. Under either, a
promoted request is ordered ahead of every ranked one, by when it was promoted; its quantum is ``quantum_s`` from then
(fcfs-slack) or from the moment it became starved (threshold), and once that has passed and it has produced a token
since promotion it is demoted (under fcfs-slack, unless it has been promoted ``run_to_end_after`` times, or was
promoted from a score class the cost model has too few finished requests of (``learn_thin_classes``), and such a run
is affordable (``run_to_end_share``, a promoted slot left free): then it keeps its slot and priority until it
finishes). With ``requeue_after_quantum`` a demoted request that holds its slot through the promotion is back in rank
order: a better-ranked waiting request may take that slot even past the cap (the paper's "promoted for a quantum");
when it is off, a promotion runs the request to its end. Threshold guarantee (tested in the simulator): with at most 2
x num_slots requests in the system, no prefill budget and no preemption cap, max_waiting_time <= threshold + quantum +
one iteration + one boundary's prefill phase. In overload no fixed threshold can be kept (every request needs a token
per threshold + quantum); fcfs-slack's bound grows with FCFS's own delay instead.

Data structures, so a decision costs O((admissions + preemptions + promotions) log n + num_slots), not O(n): waiting
requests sit in a sorted list by rank and, for starvation, in sorted lists by wait-clock start (threshold) or by
arrival and by wait start (fcfs-slack), and fcfs-slack counts the scores of requests that never started in a sorted
list (the model's classes by bisection); running requests (at most ``num_slots``) are scanned; a model refresh every
``_REFRESH_EVERY`` finishes re-reads its bounded sample and the started requests that wait. Not thread-safe: call it
from one thread (the engine loop).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from sortedcontainers import SortedList

from .policies import Policy, make_policy
from .request import Request, RequestState
from .starvation import StarvationConfig, WorkModel

_PROMOTED = 0
_NORMAL = 1
_REFRESH_EVERY = 64  # fcfs-slack: finished requests between two refreshes of the cost model
# fcfs-slack: a refresh of the cost model can move the delay estimate by a lot for a few seconds; the bound keeps its
# peak, so it reads the least estimate of the last _STEADY_S seconds
_STEADY_S = 5.0


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
        # fcfs-slack starvation control: what each request has cost the engine, and FCFS's delay (see `starvation`)
        self._fcfs_slack = self.starvation is not None and self.starvation.rule == "fcfs-slack"
        self._promoted_slots = self.starvation.promoted_slots(num_slots) if self._fcfs_slack else num_slots
        self._num_promoted_waiting = 0
        self._share_clock = 0.0  # engine seconds each slot received from decode steps, summed over time
        self._event_time: float | None = None  # the last add / schedule / token: where the next interval starts
        self._by_arrival = SortedList()  # entries (seq, req): waiting requests that never ran, oldest first
        self._resumes = SortedList()  # entries (wait start, seq, req): preempted requests waiting to resume
        self._work_model = (WorkModel(min_events=self.starvation.min_finished_per_class) if self._fcfs_slack
                            else None)
        self._learners: dict[Request, None] = {}  # promoted to run to their end for the model, since its refresh
        self._live_learners: dict[Request, None] = {}  # those not finished yet
        self._to_end: dict[Request, None] = {}  # promoted to keep their slots until they finish, not finished yet
        self._learned_s = 0.0  # engine seconds of the learners that finished
        self._engine_s = 0.0  # engine seconds attributed so far
        self._finishes_since_refresh = 0
        self._unstarted_scores = SortedList()  # scores of the requests here that never had a slot
        self._started_waiting: dict[Request, float] = {}  # started, now waiting -> expected engine seconds to go
        self._started_waiting_s = 0.0  # their sum
        self._running_rest_s = 0.0  # sum over running requests of their rest anchors (`_anchor_rest`)
        self._delay_peaks: deque[tuple[float, float]] = deque()  # (time, FCFS delay), delays decreasing
        self._recent_delays: deque[tuple[float, float]] = deque()  # (time, FCFS delay), delays increasing

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

    def _push_waiting(self, req: Request, now: float) -> None:
        req.state = RequestState.WAITING
        req._rank = self._rank(req)
        req._entry = (req._rank, req)
        self._waiting.add(req._entry)
        if self._fcfs_slack and req._started:  # preempted: what it is expected still to cost
            remaining = self._work_model.remaining(req.score, req._work_s)
            self._started_waiting[req] = remaining
            self._started_waiting_s += remaining
        if req.promoted:
            self._num_promoted_waiting += 1
        elif self._fcfs_slack:
            if req.generated:
                req._wait_entry = (now, req._seq, req)
                self._resumes.add(req._wait_entry)
            else:
                self._by_arrival.add((req._seq, req))
        elif self.starvation is not None:
            req._wait_entry = (req.wait_clock_start, req._seq, req)
            self._by_wait_start.add(req._wait_entry)

    def _pop_waiting(self, req: Request) -> None:
        self._waiting.remove(req._entry)
        req._entry = None
        if self._fcfs_slack and req._started:
            self._started_waiting_s -= self._started_waiting.pop(req)
        if req.promoted:
            self._num_promoted_waiting -= 1
        elif self._fcfs_slack and not req.generated:
            self._by_arrival.remove((req._seq, req))
        if req._wait_entry is not None:  # the threshold rule's wait clock, or fcfs-slack's resumed requests
            (self._resumes if self._fcfs_slack else self._by_wait_start).remove(req._wait_entry)
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
        if self._fcfs_slack:
            if self._running or self._waiting:
                # ending with its add: its ranker pass, engine time but no request's cost (FCFS ranks nothing)
                self._attribute_interval(None, now, exclusive=True)
            else:  # the engine was idle since the last event: no one's cost (this ranker pass is lost with it)
                self._event_time = now
            self._work_model.arrived(req.score)
            self._unstarted_scores.add(req.score)
        self._push_waiting(req, now)

    def schedule(self, now: float) -> Decision:
        """Decide this boundary's evictions and admissions (and apply them to the queues)."""
        if now < self._last_now:
            raise ValueError(f"schedule(now={now}) went back in time (last call at {self._last_now})")
        self._last_now = now
        if self._fcfs_slack:
            self._event_time = now
            if self.starvation.requeue_after_quantum:
                self._demote_expired(now)
            self._promote_past_fcfs(now)
        elif self.starvation is not None:
            self._demote_expired(now)
            self._promote_starved(now)
        decision = Decision()
        waiting = self._waiting
        if not waiting:
            return decision
        budget = self.max_prefill_tokens
        admitted: set[Request] = set()

        # 1) fill free slots, best first
        while len(self._running) < self.num_slots:
            req = self._next_to_admit()
            if req is None:
                break
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
        if self._fcfs_slack:
            self._displace_for_fcfs_slack(decision, admitted, budget)
            return decision
        best = waiting[0][1]
        if not (best.promoted or self.policy.preemptive):
            return decision
        past_cap = best.promoted and self.starvation is not None and self.starvation.preempt_past_cap
        requeue = self.starvation is not None and self.starvation.requeue_after_quantum
        under_cap = self.policy.may_be_preempted

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
            swapped, budget = self._swap(victim, challenger, decision, admitted, budget)
            if not swapped:
                break
            preempted.add(victim)
        return decision

    def on_token(self, req: Request, now: float) -> None:
        """One token was produced for running request ``req`` at time ``now``."""
        if req.state is not RequestState.RUNNING:
            raise ValueError(
                f"on_token for request {req.request_id!r} in state {req.state.value}: only running requests "
                "produce tokens"
            )
        if self._fcfs_slack:
            # the interval ending with a request's first token after admission is its prefill; one ending with a
            # token of a request that was already running is a decode step, shared by the slots
            self._attribute_interval(req, now, exclusive=req._prefill_pending)
            req._prefill_pending = False
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
        self._release_slot(req)
        del self._by_id[req.request_id]
        req.state = RequestState.FINISHED
        req.finish_time = now
        self._to_end.pop(req, None)
        if req._learner and self._live_learners.pop(req, 0) is None:
            self._learned_s += self._work_had(req)
        if self._fcfs_slack:
            self._finishes_since_refresh += 1
            if self._finishes_since_refresh >= _REFRESH_EVERY or not self._work_model.ready:
                self._refresh_work_model()
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
            self._release_slot(req)
        if self._fcfs_slack and not req._started:
            self._unstarted_scores.remove(req.score)
        if req._learner and self._live_learners.pop(req, 0) is None:
            self._learned_s += self._work_had(req)
        self._to_end.pop(req, None)
        req.state = RequestState.CANCELLED
        req.finish_time = now
        return req

    # ------------------------------------------------------------------ internals
    def _may_displace(self, challenger: Request, victim: Request) -> bool:
        if challenger.promoted or victim.promoted:
            # promoted beat non-promoted; among promoted, who starved first wins; non-promoted never win
            return challenger.promoted and challenger._rank < victim._rank
        return self.policy.may_displace(challenger._rank[1], victim._rank[1], challenger, victim)

    def _next_to_admit(self) -> Request | None:
        """The best waiting request that may take a free slot: promoted ones first while they hold fewer than
        their share of the slots (fcfs-slack) or no ranked request waits, else the best ranked one."""
        waiting = self._waiting
        if not waiting:
            return None
        head = waiting[0][1]
        k = self._num_promoted_waiting  # promoted entries sort first: the ranked ones start here
        if head.promoted and len(self._running_promoted) >= self._promoted_slots and k < len(waiting):
            return waiting[k][1]  # over their share while ranked requests wait (else a slot would stay idle)
        return head

    def _displace_for_fcfs_slack(self, decision: Decision, admitted: set[Request], budget: int | None) -> None:
        """fcfs-slack's preemption. First, promoted requests (while under their share of the slots) take the slots
        of requests whose own promotion's quantum is over, then, with ``preempt_past_cap``, of the worst-ranked
        running requests; a promoted request is never displaced. Then, once no promoted request waits for a slot,
        ranked requests displace ranked ones by the policy's rule."""
        waiting = self._waiting
        requeue = self.starvation.requeue_after_quantum
        past_cap = self.starvation.preempt_past_cap
        under_cap = self.policy.may_be_preempted

        def quantum_spent(r: Request) -> bool:  # in its slot by a promotion whose quantum is over
            return requeue and r._admitted_promoted and not r.promoted

        def promoted_may_enter() -> bool:
            return bool(self._num_promoted_waiting) and len(self._running_promoted) < self._promoted_slots

        movable = [r for r in self._running if not r.promoted and r not in admitted]
        movable.sort(key=lambda r: (quantum_spent(r), r._rank), reverse=True)  # spent quanta, then worst rank
        while (promoted_may_enter() and movable
               and (past_cap or quantum_spent(movable[0]) or under_cap(movable[0]))):
            swapped, budget = self._swap(movable.pop(0), waiting[0][1], decision, admitted, budget)
            if not swapped:
                return
        if promoted_may_enter():
            return  # the next free slot is theirs: no ranked request jumps them by preemption
        if not self.policy.preemptive:
            return
        first_ranked = self._num_promoted_waiting
        victims = [r for r in movable if under_cap(r) or quantum_spent(r)]
        victims.sort(key=_rank_of, reverse=True)
        preempted: set[Request] = set()
        for victim in victims:
            if first_ranked >= len(waiting):
                break
            challenger = waiting[first_ranked][1]
            if challenger in preempted or not self.policy.may_displace(challenger._rank[1], victim._rank[1],
                                                                       challenger, victim):
                break
            swapped, budget = self._swap(victim, challenger, decision, admitted, budget)
            if not swapped:
                break
            preempted.add(victim)

    def _swap(self, victim: Request, challenger: Request, decision: Decision, admitted: set[Request],
              budget: int | None) -> tuple[bool, int | None]:
        """Evict ``victim`` for ``challenger`` unless the prefill budget is spent; (whether it did, budget left)."""
        if budget is not None:
            if admitted and challenger.context_len > budget:
                return False, budget
            budget -= challenger.context_len
        if not self.policy.may_be_preempted(victim):
            victim.preemptions_past_cap += 1
        self._preempt(victim)
        decision.preempt.append(victim)
        self._admit(challenger)
        admitted.add(challenger)
        decision.admit.append(challenger)
        return True, budget

    def _admit(self, req: Request) -> None:
        self._pop_waiting(req)
        req.state = RequestState.RUNNING
        self._running[req] = None
        req._admitted_promoted = req.promoted
        req._share_mark = self._share_clock
        if self._fcfs_slack and not req._started:
            self._unstarted_scores.remove(req.score)
            self._work_model.started(req, req.score)
        req._started = True
        if self._fcfs_slack:
            self._anchor_rest(req)
        req._prefill_pending = True
        if req.promoted:
            self._running_promoted[req] = None

    def _release_slot(self, req: Request) -> None:
        del self._running[req]
        self._running_promoted.pop(req, None)
        if self._fcfs_slack:  # what its slot received while it held it
            req._work_s += self._share_clock - req._share_mark
            self._running_rest_s -= req._rest_anchor

    def _preempt(self, req: Request) -> None:
        self._release_slot(req)
        req.preemptions += 1
        self.num_preemptions += 1
        if req.promoted and self._quantum_over(req, self._last_now):
            req.promoted = False
        self._push_waiting(req, self._last_now)

    # ---------------------------------------------------- fcfs-slack accounting
    def _attribute_interval(self, req: Request | None, now: float, exclusive: bool) -> None:
        """Attribute the engine time since the last event: all of it to ``req`` (``exclusive``: its prefill; to no
        request when ``req`` is None: a ranker pass), or a 1/num_slots share of it to each running request (a
        decode step)."""
        if self._event_time is not None and now > self._event_time:
            dt = now - self._event_time
            self._engine_s += dt
            if exclusive:
                if req is not None:
                    req._work_s += dt
            else:
                self._share_clock += dt / self.num_slots
        if self._event_time is None or now > self._event_time:
            self._event_time = now

    def _refresh_work_model(self) -> None:
        """Re-learn the cost model from the last requests to start (`WorkModel`) and re-estimate the rest of the
        started requests that wait."""
        self._finishes_since_refresh = 0
        model = self._work_model
        model.refresh(self._observe)
        self._learners = {r: None for r in self._learners if r.state in (RequestState.RUNNING, RequestState.WAITING)}
        self._started_waiting = {r: model.remaining(r.score, r._work_s) for r in self._started_waiting}
        self._started_waiting_s = sum(self._started_waiting.values())
        self._running_rest_s = 0.0
        for r in self._running:
            self._anchor_rest(r)

    def _anchor_rest(self, req: Request) -> None:
        """Expect a running request's rest from what it has had now, then count it down with its slot's share of
        the decode steps (re-anchored at each model refresh)."""
        req._rest_anchor = self._work_model.remaining(req.score, self._work_had(req)) + self._share_clock
        self._running_rest_s += req._rest_anchor

    def _observe(self, req: Request) -> tuple[float, bool] | None:
        """A started request as the cost model sees it: (its cost, True) once finished, (what it has had so far,
        False) before, None if cancelled."""
        if req.state is RequestState.CANCELLED:
            return None
        return self._work_had(req), req.state is RequestState.FINISHED

    def _work_had(self, req: Request) -> float:
        """Engine seconds a request has had so far (a running one: including its slot's current share)."""
        if req.state is RequestState.RUNNING:
            return req._work_s + self._share_clock - req._share_mark
        return req._work_s

    def fcfs_delay_s(self) -> float:
        """fcfs-slack: how long FCFS would make a request arriving now wait. Under FCFS that depends only on the
        work ahead of it, and the work in the system is the same under every order that keeps the engine busy:
        the requests here, each at its expected cost (`WorkModel`: the whole of it for one that never started,
        the expected rest given what it has had for one that did), less what FCFS would still have running in the
        other slots when it starts the newcomer, less ``estimate_sds`` standard deviations of the unstarted
        requests' work (each one's cost is a draw from its class: on a few slots a handful of long requests decide
        the delay, and the expectation alone runs ahead of FCFS's real delay as often as behind it)."""
        model = self._work_model
        unstarted, variance = model.unstarted_work(self._unstarted_scores)
        backlog = (unstarted + self._started_waiting_s
                   + self._running_rest_s - len(self._running) * self._share_clock)
        lower = self.starvation.estimate_sds * math.sqrt(variance)
        return max(0.0, backlog - lower - model.fcfs_tail(self.num_slots))

    def promotion_wait_s(self, now: float) -> float:
        """fcfs-slack: the wait after which a request is promoted now: the longest wait FCFS would have imposed on
        a request arriving since the oldest waiting one began to wait (`fcfs_delay_s`, at each moment the least
        estimate of the ``_STEADY_S`` seconds before it), plus the slack less its reserve, less a quantum: promoted
        then, its token lands within the slack even if it waits a quantum for a promoted slot or the estimate runs a
        little ahead."""
        delay = self.fcfs_delay_s()
        recent = self._recent_delays  # the least estimate of the last _STEADY_S: a model refresh's spike is dropped
        while recent and recent[-1][1] >= delay:
            recent.pop()
        recent.append((now, delay))
        while recent[0][0] < now - _STEADY_S:
            recent.popleft()
        delay = recent[0][1]
        peaks = self._delay_peaks  # the running maximum over a window whose start only moves forward
        while peaks and peaks[-1][1] <= delay:
            peaks.pop()
        peaks.append((now, delay))
        oldest = min(self._resumes[0][0] if self._resumes else now,
                     self._by_arrival[0][1].arrival_time if self._by_arrival else now)
        while len(peaks) > 1 and peaks[1][0] <= oldest:
            peaks.popleft()
        return peaks[0][1] + max(0.0, self.starvation.aimed_slack(peaks[0][1]) - self.starvation.quantum_s)

    def _promote_past_fcfs(self, now: float) -> None:
        """Promote every waiting request that has waited longer than `promotion_wait_s`: resumed ones by their wait
        since preemption, the others by their wait since arrival, oldest first (the oldest has waited longest)."""
        bound = self.promotion_wait_s(now)
        while self._resumes and now - self._resumes[0][0] > bound:
            self._promote(self._resumes[0][2], now)
        while self._by_arrival and now - self._by_arrival[0][1].arrival_time > bound:
            self._promote(self._by_arrival[0][1], now)

    def _promote(self, req: Request, now: float) -> None:
        self._pop_waiting(req)
        req.promoted = True
        req.promotions += 1
        req._starved_at = now  # promoted requests are ordered by when they were promoted (oldest first)
        req._generated_at_promotion = req.generated
        self.num_promotions += 1
        to_end = self.starvation.run_to_end_after
        if not req._runs_to_end and (self.starvation.learn_thin_classes or (to_end and req.promotions >= to_end)):
            affordable = self._run_to_end_affordable()
            if affordable and self.starvation.learn_thin_classes and self._learns_from(req):
                req._learner = True
                self._learners[req] = None
                self._live_learners[req] = None
            req._runs_to_end = affordable and (req._learner or bool(to_end and req.promotions >= to_end))
            if req._runs_to_end:
                self._to_end[req] = None
        self._push_waiting(req, now)

    def _run_to_end_affordable(self) -> bool:
        """fcfs-slack: whether a promoted request may keep its slot to its end now: those already doing so leave at
        least one of the promoted slots to the promotions that last a quantum (a request past its bound never waits
        for a run to end), and the largest cost the model has seen (what one request run out of rank order may delay
        everyone waiting by) is at most ``run_to_end_share`` of FCFS's delay now (the wait a request arriving now
        would have ahead of it)."""
        return (len(self._to_end) < self._promoted_slots - 1
                and self._work_model.max_cost <= self.starvation.run_to_end_share * self.fcfs_delay_s())

    def _learns_from(self, req: Request) -> bool:
        """fcfs-slack, learn_thin_classes: whether ``req``, promoted, should run to its end for the cost model: its
        score class has too few finished requests (counting the learners of that class) and the learning runs,
        this one included, stay within ``learn_share`` of the engine's time so far."""
        model = self._work_model
        k = model.score_class(req.score)
        learning = sum(model.score_class(r.score) == k for r in self._learners)
        # engine seconds the learning runs have taken or are expected to take, this one included
        spent = self._learned_s + sum(max(self._work_had(r), model.estimate(r.score))
                                      for r in (*self._live_learners, req))
        return (model.finished_in_class(k) + learning < model.min_events
                and 0 < self.starvation.learn_share and spent <= self.starvation.learn_share * self._engine_s)

    def _quantum_over(self, req: Request, now: float) -> bool:
        return now >= req._starved_at + self.starvation.quantum_s and req.generated > req._generated_at_promotion

    def _demote_expired(self, now: float) -> None:
        if not self._running_promoted:
            return
        for req in [r for r in self._running_promoted if self._quantum_over(r, now) and not r._runs_to_end]:
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
            self._push_waiting(req, now)


def _rank_of(req: Request) -> tuple:
    return req._rank
