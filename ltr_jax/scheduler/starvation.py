"""Starvation control: its settings (`StarvationConfig`) and the cost model the default rule reads (`WorkModel`).

Two rules, chosen by ``rule``:

* ``fcfs-slack`` (the default). Its promise: **no request waits, for its first token or between two tokens,
  longer than first-come-first-served would have made a request arriving during that wait wait, plus
  ``slack_s``.** Under FCFS a request's wait depends only on the work ahead of it, and the work in the system is
  the same under every order that keeps the engine busy, so FCFS's delay can be estimated while another policy
  runs: the expected engine seconds of the requests here (`WorkModel`, from their ranker scores) less what they
  have had, less what FCFS would still be running in the other slots (the scheduler's ``fcfs_delay_s``). A
  request that has waited longer than the largest such delay since the oldest waiting request began to wait,
  plus ``slack_s``, is promoted: it takes the next slot (with ``preempt_past_cap``, the slot of the worst-ranked
  running request) ahead of every ranked request, for ``quantum_s`` and at least one token. Under overload FCFS
  makes everyone wait long, so the rule lets everyone wait long and promotes only the requests the ranking keeps
  waiting beyond that. Hysteresis: a promoted request is never displaced before its quantum ends; after it, with
  ``requeue_after_quantum``, it is back in rank order, and it is promoted again only once it has waited past the
  bound again, which is at least ``slack_s``. Promoted requests hold at most ``max_promoted_share`` of the slots
  while ranked requests wait (past that share the promise yields to the ranking).
* ``threshold``: the paper's rule in wall-clock seconds: a request whose wait since its last token (since arrival
  before its first) exceeds ``threshold_s`` is promoted for ``quantum_s``; under overload everyone crosses a fixed
  threshold, so it promotes and preempts in bulk. Kept for comparison.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from statistics import NormalDist

from ltr_jax.config_schema import setting

STARVATION_RULES = ("fcfs-slack", "threshold")


@dataclass(frozen=True, kw_only=True)
class StarvationConfig:
    """The config tree's ``scheduler.starvation`` section."""

    enabled: bool = setting(True, doc="promote requests that waited too long")
    rule: str = setting("fcfs-slack", choices=STARVATION_RULES,
                        doc="fcfs-slack: promote a request once it has waited slack_s longer than first-come-first-"
                            "served would have made a request arriving during its wait wait (estimated online); "
                            "threshold: promote after threshold_s of waiting (the paper's fixed rule)")
    slack_s: float = setting(30.0, gt=0, doc="fcfs-slack: seconds a request may wait beyond FCFS's delay before "
                                             "it is promoted")
    max_promoted_share: float = setting(0.5, gt=0, le=1, doc="fcfs-slack: share of the slots promoted requests "
                                                             "may hold while ranked ones wait (at least one slot)")
    threshold_s: float = setting(60.0, gt=0, doc="threshold: max waiting time (TTFT or inter-token gap) before "
                                                 "promotion")
    quantum_s: float = setting(1.0, gt=0, doc="how long a promoted request keeps its priority (and at least one "
                                              "token)")
    # Without this, under a cap of 0 a promoted request waits for a slot to free, and in overload the bound slips.
    preempt_past_cap: bool = setting(True, doc="a promoted request may evict a running one even past the policy's "
                                               "max_preemptions (else it waits for a free slot)")
    # Without this a promotion lets a request the ranker put last run to its end ahead of everyone, and the short
    # ones behind it pay (see benchmarks/RESULTS.md, starvation control).
    requeue_after_quantum: bool = setting(True, doc="when a promoted request's quantum ends it is back in rank "
                                                     "order: a better-ranked waiting request may take its slot (it "
                                                     "resumes later)")

    def __post_init__(self) -> None:
        if self.rule not in STARVATION_RULES:
            raise ValueError(f"StarvationConfig.rule must be one of {', '.join(STARVATION_RULES)}, got "
                             f"{self.rule!r}")
        for pname in ("threshold_s", "quantum_s", "slack_s"):
            value = getattr(self, pname)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"StarvationConfig.{pname} must be a finite number > 0 seconds, got {value!r}")
        share = self.max_promoted_share
        if not (isinstance(share, (int, float)) and 0 < share <= 1):
            raise ValueError(f"StarvationConfig.max_promoted_share must be in (0, 1], got {share!r}")

    def promoted_slots(self, num_slots: int) -> int:
        """How many slots promoted requests may hold at once under ``fcfs-slack``."""
        return max(1, int(self.max_promoted_share * num_slots + 1e-9))

    def describe(self) -> dict:
        """The keys that matter for this rule (what a report prints)."""
        common = {"rule": self.rule, "quantum_s": self.quantum_s, "preempt_past_cap": self.preempt_past_cap,
                  "requeue_after_quantum": self.requeue_after_quantum}
        if self.rule == "fcfs-slack":
            return {**common, "slack_s": self.slack_s, "max_promoted_share": self.max_promoted_share}
        return {**common, "threshold_s": self.threshold_s}


_NORMAL = NormalDist()
_NODES = (-3.75044, -2.366759, -1.154405, 0.0, 1.154405, 2.366759, 3.75044)  # 7-point Gauss-Hermite, N(0, 1)
_WEIGHTS = (0.00054827, 0.03075712, 0.24012318, 0.45714286, 0.24012318, 0.03075712, 0.00054827)


def _normal_correlation(pairs: list[tuple[float, float]]) -> float:
    """Correlation between "ranked shorter" and "cheaper" as a Gaussian copula's (from Spearman's rho of score
    against -cost: 2 sin(pi rho_s / 6)), clipped to [0, 1]."""
    n = len(pairs)
    if n < 3:
        return 0.0
    score_rank = _ranks([-sc for sc, _ in pairs])  # rank 0 = highest score (expected shortest)
    cost_rank = _ranks([c for _, c in pairs])  # rank 0 = cheapest
    mean = (n - 1) / 2
    cov = sum((a - mean) * (b - mean) for a, b in zip(score_rank, cost_rank))
    var = math.sqrt(sum((a - mean) ** 2 for a in score_rank) * sum((b - mean) ** 2 for b in cost_rank))
    rho_s = cov / var if var > 0 else 0.0
    return min(max(2 * math.sin(math.pi * rho_s / 6), 0.0), 1.0)


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


class WorkModel:
    """The engine seconds a request costs (its ranker pass, prefill and share of each decode step), learned from
    the last ``window`` finished requests: an estimate for a new request from its ranker score, and what FCFS
    leaves running when it starts a request.

    The estimate is a Gaussian-copula regression on ranks: a score's rank among recent scores (the highest,
    expected shortest, first) is mapped to a normal quantile ``z``, shrunk by the measured rank correlation ``rho``
    between score and cost (a ranker with tau 0.55 is far from perfect, so a request it puts last is long, but not
    the longest), and the expected cost is the mean of recent costs at the quantiles of ``rho z + sqrt(1 - rho^2)
    u`` over ``u ~ N(0, 1)``. So a request the ranker puts last counts as long even while the ranking keeps such
    requests from finishing. With no spread in the scores (no ranker) it is the mean.
    """

    def __init__(self, window: int = 2048, refresh_every: int = 64, min_samples: int = 16) -> None:
        self._recent: deque[tuple[float, float]] = deque(maxlen=window)
        self._refresh_every = refresh_every
        self._min_samples = min_samples
        self._since_refresh = 0
        self._scores: list[float] = []
        self._costs: list[float] = []
        self._mean = 0.0
        self._rho = 0.0
        self._random_point_remaining = 0.0

    @property
    def ready(self) -> bool:
        return len(self._costs) >= self._min_samples

    def finished(self, score: float, cost_s: float) -> None:
        self._recent.append((score, cost_s))
        self._since_refresh += 1
        if self._since_refresh >= self._refresh_every or (not self.ready and len(self._recent) >= self._min_samples):
            self._since_refresh = 0
            pairs = list(self._recent)
            self._scores = sorted(sc for sc, _ in pairs)
            self._costs = sorted(c for _, c in pairs)
            self._rho = _normal_correlation(pairs)
            total = sum(self._costs)
            self._mean = total / len(self._costs)
            # length-biased: a request caught at a random moment of its run has E[w^2] / (2 E[w]) still to go
            self._random_point_remaining = sum(c * c for c in self._costs) / (2 * total) if total > 0 else 0.0

    def estimate(self, score: float) -> float:
        """Engine seconds a request of this ranker score is expected to cost (0 before ``min_samples``)."""
        if not self.ready:
            return 0.0
        scores, costs, n = self._scores, self._costs, len(self._scores)
        if scores[0] == scores[-1]:
            return self._mean
        right = bisect.bisect_right(scores, score)
        ties = right - bisect.bisect_left(scores, score)
        shorter = (n - right + 0.5 * ties) / n  # share of recent requests ranked shorter than this one
        z = _NORMAL.inv_cdf(min(max(shorter, 0.5 / n), 1 - 0.5 / n))
        rho = self._rho
        spread = math.sqrt(max(0.0, 1 - rho * rho))
        return sum(weight * costs[min(int(_NORMAL.cdf(rho * z + spread * node) * n), n - 1)]
                   for node, weight in zip(_NODES, _WEIGHTS))

    def fcfs_tail(self, num_slots: int) -> float:
        """Work FCFS still has running in the other slots when it starts a request."""
        return (num_slots - 1) * self._random_point_remaining
