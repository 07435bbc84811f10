"""Scheduling policies: a priority per request (LOWER runs first) plus the policy's preemption rule.

The `Scheduler` orders requests by ``(promoted first, priority, tiebreak, arrival_time, admission sequence)`` and
asks the policy two more things: may a waiting request displace a running one (``preemptive`` and ``margin``), and how
often may one request be displaced (``max_preemptions``; None = unlimited).

Contract for ``priority(req)``: it may change only when the request produces a token (``progress_dependent``
policies) or when ``on_finish`` returns True (the policy re-calibrated; the scheduler then re-ranks everyone).
A waiting request's priority must therefore stay fixed while it waits.

Policies, selectable by name with `make_policy(name, **params)`:

* ``fcfs``: arrival order; never displaces a running request on its own (promotions still can).
* ``ltr``: the paper's rank scheduler: ``-score`` (higher ranker score = expected shorter = first); a better
  waiting request displaces the lowest-ranked running one when no slot is free.
* ``ltr-rescore``: beyond the paper: the ranker score is calibrated online into a length estimate plus an
  error distribution, and a request's priority is its expected REMAINING length given the tokens it already
  produced, so running requests move toward shortest-remaining-first as they progress; displacing a running
  request must win by more than the cost of re-prefilling its context (see `LtrRescorePolicy`).
* ``classify``: S3-style length classes: ``bucket`` (lower first), FCFS within a bucket.
* ``oracle-sjf``: true output length (benchmark only).
* ``oracle-srtf``: true remaining length ``true_output_len - generated`` (benchmark only).
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

from sortedcontainers import SortedList

from .request import Request

#: Default cap on how many times one request may be displaced (shared by every preemptive policy so that
#: policies differing only in their key make identical decisions on identical inputs). Serving allows one
#: displacement per request; the benchmarks default to none (``--max-preemptions 0``): in the simulator each
#: allowed preemption beyond the first raised mean latency, and 0 and 1 came within 1% of each other.
DEFAULT_MAX_PREEMPTIONS = 1


@dataclass
class Policy:
    """Base class. Subclasses set ``name`` and implement ``priority``."""

    name: ClassVar[str] = ""
    #: True when ``priority`` depends on ``req.generated`` (the scheduler refreshes running ranks per token).
    progress_dependent: ClassVar[bool] = False
    #: True when the policy orders by the ranker's output (so every arrival costs a ranker pass).
    uses_ranker: ClassVar[bool] = False

    preemptive: bool = True
    max_preemptions: int | None = DEFAULT_MAX_PREEMPTIONS
    margin: float = 0.0

    def __post_init__(self) -> None:
        if self.max_preemptions is not None and (
            not isinstance(self.max_preemptions, int) or self.max_preemptions < 0
        ):
            raise ValueError(
                f"policy {self.name!r}: max_preemptions must be None (unlimited) or an int >= 0, "
                f"got {self.max_preemptions!r}"
            )
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin) and self.margin >= 0):
            raise ValueError(f"policy {self.name!r}: margin must be a finite number >= 0, got {self.margin!r}")

    # ---------------------------------------------------------------- interface
    def priority(self, req: Request) -> float:
        """Lower runs first."""
        raise NotImplementedError

    def on_add(self, req: Request) -> None:
        """Called once when the request enters the scheduler; validate what the policy needs."""

    def on_finish(self, req: Request) -> bool:
        """Called when a request finishes. Return True if every request's priority may have changed."""
        return False

    def may_displace(
        self, challenger_priority: float, incumbent_priority: float, challenger: Request, incumbent: Request
    ) -> bool:
        """Whether waiting ``challenger`` may take running ``incumbent``'s slot (neither is promoted)."""
        return self.preemptive and incumbent_priority - challenger_priority > self.margin

    def tiebreak(self, req: Request) -> float:
        """Secondary key among equal priorities (before arrival order)."""
        return 0.0

    def may_be_preempted(self, req: Request) -> bool:
        return self.max_preemptions is None or req.preemptions < self.max_preemptions

    def describe(self) -> dict:
        return {"name": self.name, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


@dataclass
class FcfsPolicy(Policy):
    name: ClassVar[str] = "fcfs"
    preemptive: bool = False

    def priority(self, req: Request) -> float:
        return req.arrival_time


@dataclass
class LtrPolicy(Policy):
    name: ClassVar[str] = "ltr"
    uses_ranker: ClassVar[bool] = True

    def priority(self, req: Request) -> float:
        return -req.score


@dataclass
class ClassifyPolicy(Policy):
    name: ClassVar[str] = "classify"
    uses_ranker: ClassVar[bool] = True

    def on_add(self, req: Request) -> None:
        if not isinstance(req.bucket, int):
            raise TypeError(f"classify policy: request {req.request_id!r} has non-integer bucket {req.bucket!r}")

    def priority(self, req: Request) -> float:
        return float(req.bucket)


def _require_true_length(policy_name: str, req: Request) -> None:
    if req.true_output_len is None:
        raise ValueError(
            f"policy {policy_name!r} is an oracle for benchmarks and needs Request.true_output_len, but request "
            f"{req.request_id!r} has none; set true_output_len (simulation/replay) or use 'ltr'"
        )


@dataclass
class OracleSjfPolicy(Policy):
    name: ClassVar[str] = "oracle-sjf"

    def on_add(self, req: Request) -> None:
        _require_true_length(self.name, req)

    def priority(self, req: Request) -> float:
        return float(req.true_output_len)


@dataclass
class OracleSrtfPolicy(Policy):
    name: ClassVar[str] = "oracle-srtf"
    progress_dependent: ClassVar[bool] = True

    def on_add(self, req: Request) -> None:
        _require_true_length(self.name, req)

    def priority(self, req: Request) -> float:
        return float(req.true_output_len - req.generated)


@dataclass(frozen=True)
class _Calibration:
    """A frozen view of recent finished requests: sorted scores and lengths (for quantile matching) and the
    sorted ratios true length / estimated length with their suffix sums (for residual lengths)."""

    version: int
    scores: tuple[float, ...]
    lengths: tuple[float, ...]
    ratios: tuple[float, ...]
    ratio_suffix_sums: tuple[float, ...]  # ratio_suffix_sums[i] = sum(ratios[i:])

    @classmethod
    def build(cls, version: int, scores: list[float], lengths: list[float], ratios: list[float]) -> _Calibration:
        suffix = [0.0] * (len(ratios) + 1)
        for i in range(len(ratios) - 1, -1, -1):
            suffix[i] = suffix[i + 1] + ratios[i]
        return cls(version, tuple(scores), tuple(lengths), tuple(ratios), tuple(suffix))


def _quantile_matched_length(score: float, scores, lengths) -> float:
    """The length with the same rank among ``lengths`` as ``score`` has among ``scores`` (descending: the
    highest score maps to the shortest length), linearly interpolated. Both sequences sorted ascending."""
    n = len(scores)
    right = bisect.bisect_right(scores, score)
    ties = right - bisect.bisect_left(scores, score)
    above = n - right  # recent scores ranked shorter (higher) than this one
    position = min(max(above + 0.5 * (ties - 1), 0.0), n - 1.0)  # a recorded score maps onto its own rank
    lo = int(position)
    hi = min(lo + 1, n - 1)
    return lengths[lo] + (position - lo) * (lengths[hi] - lengths[lo])


@dataclass
class LtrRescorePolicy(Policy):
    """Expected REMAINING output length, re-estimated as the request produces tokens.

    Calibration (online, from the last ``window`` finished requests, frozen into a snapshot every
    ``refresh_every`` finishes): a score is mapped to a length estimate ``est`` by quantile matching (the
    score's rank among recent scores picks the same rank among recent lengths), so at zero tokens the order is
    exactly the ranker's order. The estimate's error is modelled by the empirical distribution of
    ``ratio = true length / est`` over finished requests. With ``g`` tokens generated the priority is the mean
    residual length ``est * E[ratio - g/est | ratio > g/est]``; a request longer than every recorded ratio gets
    ``overrun_factor * g``. Every refresh re-ranks all requests against the new snapshot (``on_finish`` returns
    True), so requests estimated at different times stay comparable. Before ``min_samples`` requests have
    finished it orders by score like ``ltr``.

    Preemption is cost-aware: a waiting request displaces a running one only if the running one's expected
    remaining length exceeds the newcomer's by more than ``margin + context_cost * victim.context_len``
    tokens (a displaced request must re-prefill its whole context later).
    """

    name: ClassVar[str] = "ltr-rescore"
    progress_dependent: ClassVar[bool] = True
    uses_ranker: ClassVar[bool] = True

    window: int = 2048
    min_samples: int = 64
    refresh_every: int = 1024
    overrun_factor: float = 0.5
    context_cost: float = 4.0
    _scores: SortedList = field(default_factory=SortedList, init=False, repr=False)
    _lengths: SortedList = field(default_factory=SortedList, init=False, repr=False)
    _ratios: SortedList = field(default_factory=SortedList, init=False, repr=False)
    _history: deque = field(default_factory=deque, init=False, repr=False)
    _calibration: _Calibration | None = field(default=None, init=False, repr=False)
    _since_refresh: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        for pname in ("window", "min_samples", "refresh_every"):
            value = getattr(self, pname)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"policy 'ltr-rescore': {pname} must be an int >= 1, got {value!r}")
        if self.min_samples > self.window:
            raise ValueError(
                f"policy 'ltr-rescore': min_samples ({self.min_samples}) must not exceed window ({self.window})"
            )
        for pname in ("overrun_factor", "context_cost"):
            value = getattr(self, pname)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"policy 'ltr-rescore': {pname} must be a finite number >= 0, got {value!r}")

    @property
    def calibrated(self) -> bool:
        return self._calibration is not None

    def describe(self) -> dict:
        return {
            "name": self.name,
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")},
        }

    def estimated_length(self, score: float) -> float:
        """Length estimate for ``score`` from the current snapshot (from the live window before the first)."""
        cal = self._calibration
        if cal is not None:
            return _quantile_matched_length(score, cal.scores, cal.lengths)
        if not self._scores:
            raise ValueError("ltr-rescore: no finished request yet, nothing to calibrate a length estimate from")
        return _quantile_matched_length(score, self._scores, self._lengths)

    def priority(self, req: Request) -> float:
        cal = self._calibration
        if cal is None:
            return -req.score
        state = req._policy_state
        if state is None or state[0] != cal.version:
            state = req._policy_state = (cal.version, _quantile_matched_length(req.score, cal.scores, cal.lengths))
        estimate = state[1]
        progress = req.generated / estimate
        i = bisect.bisect_right(cal.ratios, progress)
        longer = len(cal.ratios) - i
        if longer:
            return estimate * (cal.ratio_suffix_sums[i] / longer - progress)
        return self.overrun_factor * max(req.generated, 1)

    def tiebreak(self, req: Request) -> float:
        return -req.score

    def may_displace(
        self, challenger_priority: float, incumbent_priority: float, challenger: Request, incumbent: Request
    ) -> bool:
        threshold = self.margin + self.context_cost * incumbent.context_len
        return self.preemptive and incumbent_priority - challenger_priority > threshold

    def on_finish(self, req: Request) -> bool:
        req._policy_state = None
        length = float(max(req.generated, 1))  # lengths must stay positive: they divide the progress
        ratio = length / self.estimated_length(req.score) if self._scores else None
        self._scores.add(req.score)
        self._lengths.add(length)
        if ratio is not None:
            self._ratios.add(ratio)
        self._history.append((req.score, length, ratio))
        if len(self._history) > self.window:
            old_score, old_length, old_ratio = self._history.popleft()
            self._scores.remove(old_score)
            self._lengths.remove(old_length)
            if old_ratio is not None:
                self._ratios.remove(old_ratio)
        self._since_refresh += 1
        if len(self._scores) >= self.min_samples and self._ratios and (
            self._calibration is None or self._since_refresh >= self.refresh_every
        ):
            version = 0 if self._calibration is None else self._calibration.version + 1
            self._calibration = _Calibration.build(
                version, list(self._scores), list(self._lengths), list(self._ratios)
            )
            self._since_refresh = 0
            return True
        return False


POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (FcfsPolicy, LtrPolicy, LtrRescorePolicy, ClassifyPolicy, OracleSjfPolicy, OracleSrtfPolicy)
}
POLICY_NAMES: tuple[str, ...] = tuple(POLICIES)


def policy_parameters(name: str) -> tuple[str, ...]:
    cls = _policy_class(name)
    return tuple(f.name for f in dataclasses.fields(cls) if f.init)


def _policy_class(name: str) -> type[Policy]:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(
            f"unknown scheduling policy {name!r}; valid policies: {', '.join(POLICY_NAMES)}"
        ) from None


def make_policy(name: str, **params) -> Policy:
    """Build a policy by name, e.g. ``make_policy("ltr", max_preemptions=2, margin=0.1)``."""
    cls = _policy_class(name)
    valid = policy_parameters(name)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for policy {name!r}; "
            f"valid parameters: {', '.join(valid)}"
        )
    return cls(**params)
