"""One replayed workload's records: the requests to send (`Item`) and what a client saw of each (`Observed`),
shared by the in-process and the HTTP replays of `bench run`, and the workload's capacity from a burst of its
first requests (`workload_capacity`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Item:
    """One request of the workload: prompt tokens and the output length to replay."""

    id: str
    prompt_tokens: list[int]
    output_len: int


@dataclass
class Observed:
    """Client-side timestamps of one request.

    ``submit`` is the request's scheduled arrival (open loop: a client that sends late does not hide the wait from
    the latency), or, for the one-at-a-time probes, when it was sent; ``sent`` is when it was actually sent.
    In-process, ``token_times`` holds one time per token. Over HTTP it holds one time per streamed chunk (the
    tokens the server had ready at once) and ``tokens`` is the count the server reported in the usage record."""

    submit: float
    output_len: int
    sent: float | None = None
    token_times: list[float] = field(default_factory=list)
    finish: float | None = None
    reason: str | None = None
    tokens: int | None = None

    @property
    def n_tokens(self) -> int:
        return self.tokens if self.tokens is not None else len(self.token_times)


def workload_capacity(probe: list[Item], items: list[Item], completions_per_s: float) -> float:
    """Requests per second the engine sustains on the whole workload, from a burst of its first requests: the
    burst's completions per second scaled by its mean output length over the workload's. Unscaled, a burst of
    shorter requests than the workload's reads as a faster engine, and a load factor as a deeper overload."""
    return completions_per_s * float(np.mean([i.output_len for i in probe])) / float(
        np.mean([i.output_len for i in items]))
