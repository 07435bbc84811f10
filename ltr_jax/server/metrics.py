"""Prometheus metrics of the server, in a registry of its own (never the process-global one).

`ServerMetrics` is two things:

* the orchestrator's ``observer``: TTFT, inter-token gap, end-to-end latency, decode step time and ranker latency
  histograms, and requests by finish reason, fed from the loop thread as they happen;
* a collector read at scrape time from ``orchestrator.stats()`` for what the orchestrator already counts
  exactly: queue length, running and free slots, generated tokens, preemptions and starvation promotions.

The HTTP layer adds responses by route and status (429s, 4xx) through `count_response`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "ltr_jax"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_GAP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class _StatsCollector:
    """Gauges and counters computed from ``orchestrator.stats()`` at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self._stats = stats

    def collect(self):
        s = self._stats()
        gauges = (("queue_length", "queue_len", "Requests waiting for a decode slot"),
                  ("running_slots", "running", "Decode slots holding a running request"),
                  ("free_slots", "free_slots", "Decode slots free"),
                  ("slots", "num_slots", "Decode slots in total"),
                  ("ranker_state_bytes", "ranker_state_bytes", "Memory held by waiting requests' ranker passes"),
                  ("swapped_kv_bytes", "swapped_bytes", "Memory held by preempted requests' kept K/V"),
                  ("ranker_version", "ranker_version", "Version of the ranker head scoring now (0 = the loaded one)"),
                  ("online_live_tau_b", "online_live_tau_b", "Rolling tau-b, scores vs. recent lengths"),
                  ("online_buffer_examples", "online_buffer_examples", "Training examples buffered (online)"))
        for name, key, doc in gauges:
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=s.get(key, 0))
        counters = (("generated_tokens", "tokens_generated", "Tokens generated (tokens/s = rate of this)"),
                    ("preemptions", "preemptions", "Running requests evicted for a better-ranked one"),
                    ("starvation_promotions", "promotions", "Waiting requests promoted by starvation control"),
                    ("decode_steps", "steps", "Batched decode steps run"),
                    ("busy_seconds", "busy_seconds", "Seconds the loop spent on batch boundaries"),
                    ("steady_decode_steps", "steady_steps", "Decode steps with no admission or eviction before"),
                    ("steady_step_seconds", "steady_step_seconds", "Dispatch-to-dispatch seconds of those steps"),
                    ("steady_wait_seconds", "steady_wait_seconds", "Seconds of those blocked on the device"),
                    ("reused_ranker_passes", "reused_ranker_passes", "Prefills started from the ranker's pass"),
                    ("fused_ranker_passes", "fused_ranker_passes", "Ranker passes run inside a decode step"),
                    ("ranker_states_dropped", "ranker_states_dropped", "Kept ranker passes dropped over budget"),
                    ("resumes_from_kept_kv", "swapped_in", "Preempted requests resumed from their kept K/V"),
                    ("resumes_recomputed", "recomputed_resumes", "Preempted requests resumed by re-prefilling"),
                    ("online_rounds", "online_rounds", "Online training rounds run"),
                    ("online_accepted_heads", "online_accepted", "Candidate heads swapped in (online)"),
                    ("online_rejected_heads", "online_rejected", "Candidate heads rejected (online)"),
                    ("online_train_seconds", "online_train_seconds", "Compute seconds of online training"))
        for name, key, doc in counters:
            yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=s.get(key, 0))


class ServerMetrics:
    """Observer of the orchestrator plus the HTTP counters, all in one `CollectorRegistry`."""

    def __init__(self, model: str = "", policy: str = ""):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.token_gap = Histogram(f"{PREFIX}_inter_token_seconds", "Gap between consecutive tokens of a request",
                                   buckets=_GAP_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_request_latency_seconds", "Arrival to finish (end-to-end)",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.step = Histogram(f"{PREFIX}_decode_step_seconds", "Duration of one batched decode step",
                              buckets=_STEP_BUCKETS, registry=r)
        self.ranker = Histogram(f"{PREFIX}_ranker_latency_seconds", "Ranker scoring time of one batch of arrivals",
                                buckets=_STEP_BUCKETS + (2.5, 5.0), registry=r)
        self.ranked = Counter(f"{PREFIX}_ranked_requests", "Requests scored by the ranker", registry=r)
        self.finished = Counter(f"{PREFIX}_requests_finished", "Requests finished, by finish reason",
                                ["reason"], registry=r)
        for reason in ("stop", "length", "cancelled", "timeout", "error"):
            self.finished.labels(reason)
        self.output_tokens = Histogram(f"{PREFIX}_request_output_tokens", "Tokens generated per finished request",
                                       buckets=(1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), registry=r)
        self.responses = Counter(f"{PREFIX}_http_responses", "HTTP responses by route and status code",
                                 ["route", "status"], registry=r)
        info = Gauge(f"{PREFIX}_info", "Served model and scheduling policy", ["model", "policy"], registry=r)
        info.labels(model, policy).set(1)

    def attach_stats(self, stats: Callable[[], dict[str, Any]]) -> None:
        """Expose the orchestrator's own counters and gauges (called once the orchestrator exists)."""
        self.registry.register(_StatsCollector(stats))

    # ---------------------------------------------------------------------------- orchestrator observer
    def on_first_token(self, request_id: str, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_token_gap(self, seconds: float) -> None:
        self.token_gap.observe(seconds)

    def on_finish(self, request_id: str, reason: str, n_tokens: int, latency_s: float) -> None:
        self.finished.labels(reason).inc()
        self.e2e.observe(latency_s)
        self.output_tokens.observe(n_tokens)

    def on_step(self, batch_size: int, seconds: float, n_tokens: int) -> None:
        self.step.observe(seconds)

    def on_preempt(self, n: int) -> None:
        """Counted at scrape time from the scheduler's own counter (exact, never double counted)."""

    def on_promote(self, n: int) -> None:
        """Counted at scrape time from the scheduler's own counter (exact, never double counted)."""

    def on_ranker(self, seconds: float, n: int) -> None:
        self.ranker.observe(seconds)
        self.ranked.inc(n)

    # ---------------------------------------------------------------------------- HTTP
    def count_response(self, route: str, status: int) -> None:
        self.responses.labels(route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
