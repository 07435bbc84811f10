"""The `Request` record: what the scheduler knows about one request and the timing it observed.

Identity semantics (``eq=False``): two requests are the same only if they are the same object, so requests can
live in sets and dicts and be removed from sorted containers unambiguously.

Fields set by the caller: ``request_id``, ``arrival_time``, ``prompt_len``, ``max_tokens``, ``score`` (ranker
score; HIGHER means expected SHORTER output, so it runs first), ``true_output_len`` (oracle policies and the
simulator only), ``bucket`` (``classify`` policy; lower = shorter), ``payload`` (anything the caller wants to
attach, e.g. the engine's own per-request state).

Fields kept by the `Scheduler` (read them, do not write them): ``state``, ``generated``, ``first_token_time``,
``last_token_time``, ``token_times``, ``finish_time``, ``preemptions``, ``preemptions_past_cap``, ``promotions``,
``promoted``.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any


class RequestState(enum.Enum):
    """Lifecycle of a request inside a `Scheduler`."""

    NEW = "new"  # built, not yet added to a scheduler
    WAITING = "waiting"  # queued (never run, or preempted and holding no slot)
    RUNNING = "running"  # holds a batch slot
    FINISHED = "finished"
    CANCELLED = "cancelled"


@dataclass(eq=False)
class Request:
    request_id: str
    arrival_time: float
    prompt_len: int
    max_tokens: int
    score: float = 0.0
    true_output_len: int | None = None
    bucket: int = 0
    payload: Any = field(default=None, repr=False)

    # --- kept by the scheduler ---
    state: RequestState = RequestState.NEW
    generated: int = 0
    first_token_time: float | None = None
    last_token_time: float | None = None
    token_times: list[float] = field(default_factory=list, repr=False)
    finish_time: float | None = None
    preemptions: int = 0
    preemptions_past_cap: int = 0  # of those, past the policy's cap: for a promoted one, or after a promotion
    promotions: int = 0
    promoted: bool = False
    max_token_gap: float = 0.0  # largest gap between two consecutive tokens (0 before the second token)

    # --- scheduler-private bookkeeping (ordering entries, promotion clock, policy estimates) ---
    _seq: int = field(default=-1, repr=False)
    _rank: tuple = field(default=(), repr=False)
    _entry: tuple | None = field(default=None, repr=False)
    _wait_entry: tuple | None = field(default=None, repr=False)
    _starved_at: float = field(default=0.0, repr=False)
    _generated_at_promotion: int = field(default=0, repr=False)
    _admitted_promoted: bool = field(default=False, repr=False)  # holds its slot through a promotion
    _policy_state: Any = field(default=None, repr=False)
    _share_mark: float = field(default=0.0, repr=False)  # the decode share clock when it last took a slot
    _prefill_pending: bool = field(default=False, repr=False)  # admitted, its first token not yet produced
    _work_s: float = field(default=0.0, repr=False)  # engine seconds it has cost (fcfs-slack starvation control)
    _started: bool = field(default=False, repr=False)  # it has had a slot
    _learner: bool = field(default=False, repr=False)  # promoted to run to its end for the cost model (fcfs-slack)
    _runs_to_end: bool = field(default=False, repr=False)  # promoted to keep its slot until it finishes (fcfs-slack)
    _rest_anchor: float = field(default=0.0, repr=False)  # running: expected rest + the share clock when estimated

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_len, int) or self.prompt_len < 1:
            raise ValueError(f"Request {self.request_id!r}: prompt_len must be an int >= 1, got {self.prompt_len!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"Request {self.request_id!r}: max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.arrival_time):
            raise ValueError(f"Request {self.request_id!r}: arrival_time must be finite, got {self.arrival_time!r}")
        if not math.isfinite(self.score):
            raise ValueError(
                f"Request {self.request_id!r}: score must be a finite float, got {self.score!r} "
                "(NaN/inf scores would make the priority order undefined)"
            )
        if self.true_output_len is not None and self.true_output_len < 1:
            raise ValueError(
                f"Request {self.request_id!r}: true_output_len must be >= 1 or None, got {self.true_output_len!r}"
            )

    # ------------------------------------------------------------------ timing
    def record_token(self, now: float) -> None:
        """One token was produced at time ``now`` (called by the scheduler's ``on_token``)."""
        last = self.last_token_time
        if last is None:
            self.first_token_time = now
        else:
            gap = now - last
            self.max_token_gap = max(self.max_token_gap, gap)
        self.last_token_time = now
        self.token_times.append(now)
        self.generated += 1

    @property
    def context_len(self) -> int:
        """Tokens a resume must re-prefill: the prompt plus everything generated so far."""
        return self.prompt_len + self.generated

    @property
    def wait_clock_start(self) -> float:
        """When the request's current wait began: its last token, or its arrival before the first token."""
        return self.arrival_time if self.last_token_time is None else self.last_token_time

    @property
    def ttft(self) -> float | None:
        """Time to first token (seconds), None before the first token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def max_waiting_time(self) -> float | None:
        """max(TTFT, largest inter-token gap): the paper's per-request fairness measure. None before a token."""
        ttft = self.ttft
        if ttft is None:
            return None
        return max(ttft, self.max_token_gap)

    @property
    def latency(self) -> float | None:
        """End-to-end latency (finish - arrival), None until finished or cancelled."""
        if self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time

    @property
    def normalized_latency(self) -> float | None:
        """Latency per generated token (seconds/token), the paper's headline metric."""
        latency = self.latency
        if latency is None or self.generated == 0:
            return None
        return latency / self.generated

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first: (last - first token) / (generated - 1); None below 2 tokens."""
        if self.generated < 2 or self.first_token_time is None or self.last_token_time is None:
            return None
        return (self.last_token_time - self.first_token_time) / (self.generated - 1)

    @property
    def remaining_true(self) -> int:
        """True tokens still to generate (oracle/simulation only)."""
        if self.true_output_len is None:
            raise ValueError(
                f"Request {self.request_id!r} has no true_output_len; only oracle policies and the simulator "
                "need it (set Request.true_output_len, or pick a non-oracle policy)"
            )
        return self.true_output_len - self.generated
