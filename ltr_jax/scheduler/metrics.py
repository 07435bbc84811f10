"""Summary metrics over finished `Request` records (shared by the simulator and the serving benchmark).

`summarize(records)` returns a JSON-ready dict: end-to-end latency, normalized latency (latency / output
tokens, the paper's headline), TTFT, TPOT, max_waiting_time (max(TTFT, max inter-token gap), the paper's
fairness measure), throughput, preemptions and promotions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from .request import Request, RequestState


def distribution(values: Sequence[float], percentiles: Sequence[int] = (50, 90, 99)) -> dict:
    """mean, requested percentiles and max of ``values`` (NaN when empty)."""
    if len(values) == 0:
        return {"mean": math.nan, **{f"p{p}": math.nan for p in percentiles}, "max": math.nan}
    arr = np.asarray(values, dtype=float)
    out = {"mean": float(arr.mean())}
    for p, v in zip(percentiles, np.percentile(arr, percentiles)):
        out[f"p{p}"] = float(v)
    out["max"] = float(arr.max())
    return out


def summarize(records: Iterable[Request]) -> dict:
    records = list(records)
    finished = [r for r in records if r.state is RequestState.FINISHED]
    if not finished:
        return {"num_requests": len(records), "num_finished": 0}
    start = min(r.arrival_time for r in finished)
    end = max(r.finish_time for r in finished)
    makespan = end - start
    tokens = sum(r.generated for r in finished)
    tpots = [t for t in (r.tpot for r in finished) if t is not None]
    return {
        "num_requests": len(records),
        "num_finished": len(finished),
        "num_cancelled": sum(r.state is RequestState.CANCELLED for r in records),
        "makespan_s": makespan,
        "throughput_req_s": len(finished) / makespan if makespan > 0 else math.nan,
        "throughput_tok_s": tokens / makespan if makespan > 0 else math.nan,
        "output_tokens": tokens,
        "latency_s": distribution([r.latency for r in finished]),
        "normalized_latency_s_per_token": distribution([r.normalized_latency for r in finished]),
        "ttft_s": distribution([r.ttft for r in finished]),
        "tpot_s": distribution(tpots),
        "max_waiting_time_s": distribution([r.max_waiting_time for r in finished]),
        "preemptions": sum(r.preemptions for r in finished),
        "requests_preempted": sum(r.preemptions > 0 for r in finished),
        "max_preemptions_per_request": max(r.preemptions for r in finished),
        "promotions": sum(r.promotions for r in finished),
        "requests_promoted": sum(r.promotions > 0 for r in finished),
    }
