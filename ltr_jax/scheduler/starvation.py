"""Starvation control: its settings (`StarvationConfig`) and the cost model the default rule reads (`WorkModel`).

Two rules, chosen by ``rule``:

* ``fcfs-slack`` (the default). Its promise: **no request waits, for its first token or between two tokens, longer
  than first-come-first-served would have made a request arriving during that wait wait, plus the slack: ``slack_s``
  or ``slack_share`` of that FCFS delay, whichever is more.** The estimate of FCFS's delay errs by a share of it (its
  cost classes are learned from samples), so a slack that absorbs the error grows with the delay; and it is taken
  ``estimate_sds`` standard deviations of the unstarted requests' work below its expectation, since on a few slots a
  handful of long requests decide FCFS's delay and the expectation alone runs ahead of it half the time. The rule aims
  ``slack_reserve`` of the slack inside its promise: the worst wait sits on the aim, so an estimate that runs a little
  high (a few per cent either way, on the best-learned traces too) would otherwise pass the promise; and a server's
  run differs from FCFS's by the ranker passes, which FCFS would not run: they are engine time but no request's cost.
  Under FCFS a request's wait depends only on the work ahead of it, and the work in the system is the same under every
  order that keeps the engine busy, so FCFS's delay can be estimated while another policy runs: the expected engine
  seconds still to go of the requests here (`WorkModel`, from their ranker scores and what they have had), less what
  FCFS would still be running in the other slots (the scheduler's ``fcfs_delay_s``). The cost model learns from the
  requests that started, counting unfinished ones as lower bounds, so it is not fooled by the ranking finishing short
  requests first; where the ranking lets no request of a score class finish it errs low, which promotes early rather
  than late. A request that has waited longer than the largest such delay since the oldest waiting request began to
  wait, plus the slack less its reserve and ``quantum_s`` (so that its token lands within the slack), is promoted: it
  takes the next slot (with ``preempt_past_cap``, the slot of the worst-ranked running request) ahead of every ranked
  request, for ``quantum_s`` and at least one token. Under overload FCFS makes everyone wait long, so the rule lets
  everyone wait long and promotes only the requests the ranking keeps waiting beyond that. Hysteresis: a promoted
  request is never displaced before its quantum ends; after it, with ``requeue_after_quantum``, it is back in rank
  order, and it is promoted again only once it has waited past the bound again, at least the slack less its reserve
  and ``quantum_s``; a request promoted ``run_to_end_after`` times keeps its slot until it finishes (the ranking would
  starve it again), so no request is promoted more often than that. A promoted request whose score class has fewer
  than ``min_finished_per_class`` finished requests (counting the ones already running to their end for this) also
  keeps its slot until it finishes (``learn_thin_classes``): the ranking lets the classes it defers finish only
  through promotions, so without these their costs are known only as lower bounds, the estimate runs low and the rule
  promotes early and often; a request promoted by its age, not its length, is a fair sample of its class. Such runs
  are out of rank order, so a new one starts only while they, counted at what they have had or are expected to cost
  (this one included), come to at most ``learn_share`` of the engine's time so far. Every run to the end (either kind)
  holds a slot out of rank order that everyone waiting waits for, so it happens only while the largest cost the model
  has seen is at most ``run_to_end_share`` of FCFS's delay (on a large engine one request is a small part of
  everyone's wait; on a few slots it is not, and there promotions are quanta), and while such runs leave at least one
  of the promoted slots to the promotions of a quantum (a request past its bound never waits for someone's whole run).
  Promoted requests hold at most ``max_promoted_share`` of the slots while ranked requests wait (past that share the
  promise yields to the ranking).
* ``threshold``: the paper's rule in wall-clock seconds: a request whose wait since its last token (since arrival
  before its first) exceeds ``threshold_s`` is promoted for ``quantum_s``; under overload everyone crosses a fixed
  threshold, so it promotes and preempts in bulk. Kept for comparison.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from ltr_jax.config_schema import setting

STARVATION_RULES = ("fcfs-slack", "threshold")


def slack_for(slack_s: float, slack_share: float, fcfs_delay_s: float) -> float:
    """fcfs-slack's slack on top of FCFS's delay: ``slack_s`` or ``slack_share`` of the delay, whichever is more."""
    return max(slack_s, slack_share * fcfs_delay_s)


def _below_one(value: float) -> str | None:
    return None if value < 1 else "a share below 1"


@dataclass(frozen=True, kw_only=True)
class StarvationConfig:
    """The config tree's ``scheduler.starvation`` section."""

    enabled: bool = setting(True, doc="promote requests that waited too long")
    rule: str = setting("fcfs-slack", choices=STARVATION_RULES,
                        doc="fcfs-slack: nobody waits longer than first-come-first-served would have made a "
                            "request arriving during the wait wait (estimated online), plus the slack; threshold: "
                            "promote after threshold_s of waiting (the paper's fixed rule)")
    # slack_s and slack_share are the promise; the rule aims slack_reserve inside them, at about where the seventh
    # version aimed, whose promotions on AlpacaEval traffic were measured (benchmarks/RESULTS.md, eighth version).
    slack_s: float = setting(33.0, gt=0, doc="fcfs-slack: the promise's slack: seconds a request may wait beyond "
                                             "FCFS's delay")
    slack_share: float = setting(0.28, ge=0, doc="fcfs-slack: the slack is the larger of slack_s and this share of "
                                                 "FCFS's delay (0: slack_s alone)")
    slack_reserve: float = setting(0.1, ge=0, check=_below_one,
                                   doc="fcfs-slack: share of the slack kept in reserve for the FCFS estimate's "
                                       "error: a request is promoted once it has waited the estimate plus (1 - "
                                       "this) of the slack")
    estimate_sds: float = setting(1.0, ge=0, doc="fcfs-slack: FCFS's delay is estimated this many standard "
                                                 "deviations of the unstarted requests' work below its expectation "
                                                 "(0: the expectation)")
    max_promoted_share: float = setting(0.5, gt=0, le=1, doc="fcfs-slack: share of the slots promoted requests "
                                                             "may hold while ranked ones wait (at least one slot)")
    threshold_s: float = setting(60.0, gt=0, doc="threshold: max waiting time (TTFT or inter-token gap) before "
                                                 "promotion")
    # A promotion's job is a token that ends a wait; whatever else it runs is work out of rank order.
    quantum_s: float = setting(0.25, gt=0, doc="how long a promoted request keeps its priority (and at least one "
                                               "token)")
    run_to_end_after: int = setting(2, ge=0, doc="fcfs-slack: a request promoted this many times keeps its slot "
                                                 "and priority until it finishes (0: never)")
    # Without this, under a cap of 0 a promoted request waits for a slot to free, and in overload the bound slips.
    preempt_past_cap: bool = setting(True, doc="a promoted request may evict a running one even past the policy's "
                                               "max_preemptions (else it waits for a free slot)")
    # Without this a promotion lets a request the ranker put last run to its end ahead of everyone, and the short
    # ones behind it pay (see benchmarks/RESULTS.md, starvation control).
    requeue_after_quantum: bool = setting(True, doc="when a promoted request's quantum ends it is back in rank "
                                                     "order: a better-ranked waiting request may take its slot (it "
                                                     "resumes later)")

    learn_thin_classes: bool = setting(True, doc="fcfs-slack: a promoted request whose score class has fewer than "
                                                 "min_finished_per_class finished requests runs to its end, so "
                                                 "the classes the ranking defers are learned from their own requests")
    # The classes the ranking defers finish only through these runs, so their costs come from this many requests:
    # the estimate's error falls as 1 / sqrt(this) (benchmarks/RESULTS.md, seventh version).
    min_finished_per_class: int = setting(32, ge=1, doc="fcfs-slack: finished requests the cost model wants in each "
                                                        "score class; a class with fewer is pooled with its "
                                                        "neighbours, and with learn_thin_classes its promoted "
                                                        "requests run to their end")
    # Each such request runs out of rank order: on an engine of a few slots, unbounded, they take a large share of
    # it and cost ltr's gain (benchmarks/RESULTS.md, third version); at paper scale the bound is never reached.
    learn_share: float = setting(0.0625, ge=0, le=1, doc="fcfs-slack: share of the engine's time so far that the "
                                                         "requests run to their end by learn_thin_classes may have "
                                                         "taken when another one starts")

    # One request's rest is a small part of everyone's wait on a large engine and a large part of it on a few slots
    # (benchmarks/RESULTS.md, fourth version).
    run_to_end_share: float = setting(0.0625, ge=0, le=1, doc="fcfs-slack: a promoted request keeps its slot to its "
                                                              "end (run_to_end_after, learn_thin_classes) only while "
                                                              "the largest cost the cost model has seen is at most "
                                                              "this share of FCFS's delay then; else it is back in "
                                                              "rank order after its quantum")

    def __post_init__(self) -> None:
        if self.rule not in STARVATION_RULES:
            raise ValueError(f"StarvationConfig.rule must be one of {', '.join(STARVATION_RULES)}, got "
                             f"{self.rule!r}")
        for pname in ("threshold_s", "quantum_s", "slack_s"):
            value = getattr(self, pname)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"StarvationConfig.{pname} must be a finite number > 0 seconds, got {value!r}")
        if not (isinstance(self.min_finished_per_class, int) and self.min_finished_per_class >= 1):
            raise ValueError(f"StarvationConfig.min_finished_per_class must be an int >= 1, got "
                             f"{self.min_finished_per_class!r}")
        if not (isinstance(self.run_to_end_after, int) and self.run_to_end_after >= 0):
            raise ValueError(f"StarvationConfig.run_to_end_after must be an int >= 0, got {self.run_to_end_after!r}")
        for pname in ("learn_share", "run_to_end_share"):
            value = getattr(self, pname)
            if not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ValueError(f"StarvationConfig.{pname} must be in [0, 1], got {value!r}")
        if not (isinstance(self.slack_reserve, (int, float)) and 0 <= self.slack_reserve < 1):
            raise ValueError(f"StarvationConfig.slack_reserve must be in [0, 1), got {self.slack_reserve!r}")
        for pname in ("slack_share", "estimate_sds"):
            value = getattr(self, pname)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"StarvationConfig.{pname} must be a finite number >= 0, got {value!r}")
        share = self.max_promoted_share
        if not (isinstance(share, (int, float)) and 0 < share <= 1):
            raise ValueError(f"StarvationConfig.max_promoted_share must be in (0, 1], got {share!r}")

    def promoted_slots(self, num_slots: int) -> int:
        """How many slots promoted requests may hold at once under ``fcfs-slack``."""
        return max(1, int(self.max_promoted_share * num_slots + 1e-9))

    def slack_for(self, fcfs_delay_s: float) -> float:
        """fcfs-slack: how much longer than ``fcfs_delay_s`` (FCFS's delay) a request may wait."""
        return slack_for(self.slack_s, self.slack_share, fcfs_delay_s)

    def aimed_slack(self, fcfs_delay_s: float) -> float:
        """fcfs-slack: how much longer than the estimate of FCFS's delay the rule lets a request wait: the slack
        less its reserve (the estimate errs a few per cent either way, and the worst wait sits on the aim)."""
        return (1.0 - self.slack_reserve) * self.slack_for(fcfs_delay_s)

    def describe(self) -> dict:
        """The keys that matter for this rule (what a report prints)."""
        common = {"rule": self.rule, "quantum_s": self.quantum_s, "preempt_past_cap": self.preempt_past_cap,
                  "requeue_after_quantum": self.requeue_after_quantum}
        if self.rule == "fcfs-slack":
            return {**common, "slack_s": self.slack_s, "slack_share": self.slack_share,
                    "slack_reserve": self.slack_reserve, "estimate_sds": self.estimate_sds,
                    "max_promoted_share": self.max_promoted_share,
                    "run_to_end_after": self.run_to_end_after, "learn_thin_classes": self.learn_thin_classes,
                    "min_finished_per_class": self.min_finished_per_class, "learn_share": self.learn_share,
                    "run_to_end_share": self.run_to_end_share}
        return {**common, "threshold_s": self.threshold_s}


class WorkModel:
    """The engine seconds a request costs (its ranker pass, prefill and share of each decode step), by ranker
    score, learned without the bias of the order the engine serves in.

    A ranking policy finishes the requests it ranks short first and defers the long ones, so the requests that
    finished are a sample biased towards short ones, and more so the deeper the overload. What is not biased by
    length is which requests *started*: a request takes its first slot by its rank and arrival (or by a
    promotion), never by its true length. So the model learns from started requests, each at its cost if it
    finished and, if not, at what it has had so far, a lower bound (a right-censored observation). The scores of
    the last ``window`` arrivals are cut into ``bins`` quantile classes, and each class keeps its last
    ``per_class`` requests to start: a class the ranking rarely starts (the longest under overload) still has
    older requests that ran to their end. Within a class (pooled with its neighbours while it holds fewer than
    ``min_events`` finished requests) a Kaplan-Meier estimate of the cost's distribution gives the expected cost
    of a request that has not started and the expected rest of one that has had ``w`` seconds,
    ``E[C - w | C > w]``. A class whose estimate ends with requests still unfinished continues with the tail of
    the next shorter class (a lower bound); past the largest cost seen the rest counts as 0 (it errs low). With no
    spread in the scores (no ranker) there is one class.
    """

    def __init__(self, *, min_events: int, window: int = 4096, bins: int = 16, per_class: int = 512) -> None:
        if min(window, bins, per_class, min_events) < 1:
            raise ValueError(f"WorkModel needs window, bins, per_class and min_events >= 1, got {window}, {bins}, "
                             f"{per_class}, {min_events}")
        self._arrived: deque[float] = deque(maxlen=window)
        self._bins = bins
        self._per_class = per_class
        self._min_events = min_events
        self._ready = False
        self._edges: list[float] = []  # class k holds scores in [edges[k - 1], edges[k]) (open at both ends)
        self._pools: list[deque[tuple[int, float, object]]] = [deque(maxlen=per_class)]  # (start seq, score, item)
        self._num_started = 0
        self._curves: list[_Survival] = []
        self._finished: list[int] = [0]  # finished requests of each class in the sample at the last refresh
        self._tail = 0.0
        self._max_cost = 0.0

    @property
    def ready(self) -> bool:
        return self._ready

    def arrived(self, score: float) -> None:
        """A request of this score arrived (the score classes are quantiles of recent arrivals)."""
        self._arrived.append(score)

    def started(self, item: object, score: float) -> None:
        """``item`` (a request) of this score took its first slot: it joins its class's sample."""
        self._num_started += 1
        self._pools[bisect.bisect_right(self._edges, score)].append((self._num_started, score, item))

    def refresh(self, observe: Callable[[object], tuple[float, bool] | None]) -> None:
        """Re-learn: ``observe(item)`` gives a started request's ``(cost_s, finished)``, where an unfinished one's
        ``cost_s`` is what it has had so far, or None to drop it (cancelled). Not ready until ``min_events`` of the
        sample finished."""
        kept = []  # ((start seq, score, item), (cost_s, finished)), oldest start first
        for x in sorted((x for pool in self._pools for x in pool), key=lambda x: x[0]):
            obs = observe(x[2])
            if obs is not None:
                kept.append((x, obs))
        if sum(done for _, (_, done) in kept) < self._min_events:
            return
        self._ready = True
        self._max_cost = max(cost for _, (cost, _) in kept)
        arrived = sorted(self._arrived) or sorted(x[1] for x, _ in kept)
        n = len(arrived)
        edges = sorted({arrived[(k * n) // self._bins] for k in range(1, self._bins)})
        self._edges = edges = [e for e in edges if e > arrived[0]]  # no empty class below the lowest score
        num = len(edges) + 1
        pools: list[list[tuple[int, float, object]]] = [[] for _ in range(num)]
        classes: list[list[tuple[float, bool]]] = [[] for _ in range(num)]
        for x, obs in kept:
            k = bisect.bisect_right(edges, x[1])
            pools[k].append(x)
            classes[k].append(obs)
        self._pools = [deque(p, maxlen=self._per_class) for p in pools]  # the last per_class of each class
        classes = [c[-self._per_class:] for c in classes]
        self._finished = [sum(done for _, done in c) for c in classes]
        shares = [0] * num
        for score in arrived:
            shares[bisect.bisect_right(edges, score)] += 1
        self._curves = []
        for k in range(num):
            pool, lo, hi = list(classes[k]), k, k
            while sum(done for _, done in pool) < self._min_events and (lo > 0 or hi < num - 1):
                if lo > 0:
                    lo -= 1
                    pool += classes[lo]
                if hi < num - 1:
                    hi += 1
                    pool += classes[hi]
            self._curves.append(_Survival(pool))
        for k in range(num - 2, -1, -1):  # from the shortest class down: tails cut short by censoring
            self._curves[k].extend_tail(self._curves[k + 1])
        mean = sum(sh * c.mean for sh, c in zip(shares, self._curves)) / n
        second = sum(sh * c.second_moment for sh, c in zip(shares, self._curves)) / n
        # length-biased: a request caught at a random moment of its run has E[C^2] / (2 E[C]) still to go
        self._tail = second / (2 * mean) if mean > 0 else 0.0

    def score_class(self, score: float) -> int:
        return bisect.bisect_right(self._edges, score)

    def finished_in_class(self, k: int) -> int:
        """Finished requests of class ``k`` in the sample at the last refresh (0 before the first)."""
        return self._finished[k] if self._ready else 0

    @property
    def max_cost(self) -> float:
        """The largest cost (an unfinished request's: what it has had) in the sample at the last refresh (0 before
        the first)."""
        return self._max_cost

    @property
    def min_events(self) -> int:
        return self._min_events

    def _curve(self, score: float) -> _Survival:
        return self._curves[bisect.bisect_right(self._edges, score)]

    def estimate(self, score: float) -> float:
        """Engine seconds a request of this ranker score is expected to cost (0 until ready)."""
        return self._curve(score).mean if self._ready else 0.0

    def remaining(self, score: float, had_s: float) -> float:
        """Expected engine seconds still to go for a request of this score that has had ``had_s``."""
        return self._curve(score).remaining(had_s) if self._ready else 0.0

    def unstarted_work(self, scores) -> tuple[float, float]:
        """Expected engine seconds of requests that have not started, given their scores sorted ascending
        (a ``SortedList``: a count per class by bisection, so O(classes log n)), and the variance of that sum
        (each request's cost a draw from its class's curve)."""
        if not self._ready or not scores:
            return 0.0, 0.0
        total, var, below = 0.0, 0.0, 0
        edges = self._edges
        for k, curve in enumerate(self._curves):  # class k ends at edges[k]; the last class at the end
            upto = scores.bisect_left(edges[k]) if k < len(edges) else len(scores)
            total += (upto - below) * curve.mean
            var += (upto - below) * max(0.0, curve.second_moment - curve.mean ** 2)
            below = upto
        return total, var

    def fcfs_tail(self, num_slots: int) -> float:
        """Work FCFS still has running in the other slots when it starts a request."""
        return (num_slots - 1) * self._tail


class _Survival:
    """A Kaplan-Meier estimate of a cost's distribution from observations ``(cost, finished)`` (unfinished ones
    are lower bounds), restricted to the largest cost observed: its mean, second moment and the expected rest
    ``E[C - w | C > w]``."""

    def __init__(self, observations: list[tuple[float, bool]]) -> None:
        obs = sorted(observations)
        at_risk = len(obs)
        xs: list[float] = []  # distinct observed costs, ascending
        surv: list[float] = []  # S(t) on [xs[k], xs[k + 1]); past xs[-1] the estimate ends
        s = 1.0
        i = 0
        while i < len(obs):
            x = obs[i][0]
            events = leaving = 0
            while i < len(obs) and obs[i][0] == x:
                events += obs[i][1]
                leaving += 1
                i += 1
            if at_risk > 0:
                s *= 1.0 - events / at_risk
            at_risk -= leaving
            xs.append(x)
            surv.append(s)
        self._set(xs, surv)

    def _set(self, xs: list[float], surv: list[float]) -> None:
        area = [0.0] * (len(xs) + 1)  # area[k]: the integral of S from xs[k] to the last observed cost
        for k in range(len(xs) - 2, -1, -1):
            area[k] = area[k + 1] + surv[k] * (xs[k + 1] - xs[k])
        self._xs, self._surv, self._area = xs, surv, area
        self.mean = (xs[0] + area[0]) if xs else 0.0
        second = xs[0] ** 2 if xs else 0.0
        for k in range(len(xs) - 1):
            second += surv[k] * (xs[k + 1] ** 2 - xs[k] ** 2)
        self.second_moment = second

    def at(self, t: float) -> float:
        """S(t), 0 past the largest cost observed."""
        k = bisect.bisect_right(self._xs, t) - 1
        if k < 0:
            return 1.0
        return self._surv[k] if k < len(self._xs) - 1 else 0.0

    def extend_tail(self, shorter: _Survival) -> None:
        """Where this estimate ends with requests still unfinished (S > 0 at its largest cost), continue it with
        the tail of a class expected to be ``shorter`` (capped at this class's last level): a class the ranking
        rarely lets finish is at least as long as the next shorter one."""
        xs, surv = self._xs, self._surv
        if not xs or surv[-1] <= 0:
            return
        level, end = surv[-1], xs[-1]
        ext_xs, ext_surv = list(xs), surv[:-1] + [min(level, shorter.at(end))]
        for x, s in zip(shorter._xs, shorter._surv):
            if x > end:
                ext_xs.append(x)
                ext_surv.append(min(level, s))
        self._set(ext_xs, ext_surv)

    def remaining(self, had_s: float) -> float:
        xs = self._xs
        if not xs:
            return 0.0
        k = bisect.bisect_right(xs, had_s) - 1
        if k < 0:
            return xs[0] - had_s + self._area[0]
        if k >= len(xs) - 1 or self._surv[k] <= 0:
            return 0.0
        return (self._surv[k] * (xs[k + 1] - had_s) + self._area[k + 1]) / self._surv[k]
