"""HTTP load generator: many concurrent streaming clients against a running server, and what they observed.

`run_load_test(url, clients=200, ...)` opens ``clients`` concurrent streaming ``/v1/completions`` requests
(``ignore_eos`` + ``max_tokens``, so every accepted request must produce exactly ``max_tokens`` tokens), lets a
fraction of them hang up mid-stream, then waits until the server's ``/metrics`` shows no queued or running
request. The summary says how many were accepted, rejected with 429, completed exactly once with the full token
count, disconnected, or broken, plus latency percentiles and throughput. `scripts/load_test.py` is its CLI.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families


@dataclass
class ClientResult:
    index: int
    status: int | None = None  # HTTP status (None: the connection failed)
    finish_reasons: int = 0  # chunks carrying a finish_reason (exactly 1 for a complete stream)
    done_markers: int = 0  # "data: [DONE]" lines (exactly 1 for a complete stream)
    finish_reason: str | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    ttft_s: float | None = None
    latency_s: float | None = None
    disconnected: bool = False
    error: str | None = None
    retry_after: str | None = None


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def error_message(resp: httpx.Response) -> str:
    """The message of a refused request: the OpenAI-style error body's message, else the body's start."""
    text = (await resp.aread()).decode(errors="replace")
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text[:200]


async def stream_events(resp: httpx.Response) -> AsyncIterator[dict | None]:
    """The JSON payloads of a server-sent-event stream of completion chunks, in order; None for ``data: [DONE]``."""
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        yield None if data == "[DONE]" else json.loads(data)


async def _one_client(client: httpx.AsyncClient, url: str, index: int, model: str, max_tokens: int,
                      disconnect_after_chunks: int | None, api_key: str | None, start: asyncio.Event) -> ClientResult:
    result = ClientResult(index)
    body = {"model": model, "prompt": f"Load test client {index}: tell me a story about the number {index}.",
            "max_tokens": max_tokens, "temperature": 0.8, "seed": index, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    await start.wait()
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=_headers(api_key)) as resp:
            result.status = resp.status_code
            if resp.status_code != 200:
                result.retry_after = resp.headers.get("retry-after")
                result.error = await error_message(resp)
                return result
            async for obj in stream_events(resp):
                if obj is None:
                    result.done_markers += 1
                    continue
                if "error" in obj:
                    result.error = obj["error"].get("message")
                    continue
                if obj.get("usage"):
                    result.completion_tokens = obj["usage"]["completion_tokens"]
                for choice in obj.get("choices", []):
                    result.chunks += 1
                    if result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - t0
                    if choice.get("finish_reason"):
                        result.finish_reasons += 1
                        result.finish_reason = choice["finish_reason"]
                if disconnect_after_chunks is not None and result.chunks >= disconnect_after_chunks \
                        and not result.finish_reasons:
                    result.disconnected = True
                    break  # leaving the context manager closes the connection mid-stream
    except httpx.HTTPError as err:
        result.error = f"{type(err).__name__}: {err}"
    result.latency_s = time.perf_counter() - t0
    return result


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {sample name with labels, e.g. 'ltr_jax_requests_finished_total{reason="stop"}': value}."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


async def scrape_metrics(client: httpx.AsyncClient, url: str) -> dict[str, float]:
    resp = await client.get(f"{url}/metrics")
    resp.raise_for_status()
    return parse_metrics(resp.text)


async def wait_until_idle(client: httpx.AsyncClient, url: str, timeout_s: float = 30.0) -> dict[str, float]:
    """Poll /metrics until no request is queued or running (or the timeout passes); the last scrape."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = await scrape_metrics(client, url)
        if (m.get("ltr_jax_running_slots", 1) == 0 and m.get("ltr_jax_queue_length", 1) == 0) \
                or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.05)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 4), "p95": round(float(np.percentile(arr, 95)), 4),
            "max": round(float(arr.max()), 4)}


async def run_load_test_async(url: str, clients: int = 200, max_tokens: int = 64, disconnect_fraction: float = 0.0,
                              disconnect_after_chunks: int = 2, model: str | None = None, api_key: str | None = None,
                              timeout_s: float = 120.0) -> dict:
    """Run the test; returns a JSON-able summary plus the per-client results under 'clients'."""
    url = url.rstrip("/")
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s)) as client:
        if model is None:
            resp = await client.get(f"{url}/v1/models", headers=_headers(api_key))
            resp.raise_for_status()
            model = resp.json()["data"][0]["id"]
        before = await scrape_metrics(client, url)
        every = round(1 / disconnect_fraction) if disconnect_fraction > 0 else 0
        start = asyncio.Event()
        tasks = [asyncio.create_task(_one_client(client, url, i, model, max_tokens,
                                                 disconnect_after_chunks if every and i % every == 0 else None,
                                                 api_key, start)) for i in range(clients)]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        start.set()
        results: list[ClientResult] = await asyncio.wait_for(asyncio.gather(*tasks), timeout_s)
        wall = time.perf_counter() - t0
        after = await wait_until_idle(client, url)

    accepted = [r for r in results if r.status == 200]
    rejected = [r for r in results if r.status == 429]
    disconnected = [r for r in accepted if r.disconnected]
    finished = [r for r in accepted if not r.disconnected]
    complete = [r for r in finished if r.finish_reasons == 1 and r.done_markers == 1 and r.error is None
                and r.completion_tokens == max_tokens and r.finish_reason == "length"]
    broken = [r for r in finished if r not in complete]
    other = [r for r in results if r.status not in (200, 429)]
    tokens = sum(r.completion_tokens or 0 for r in complete)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    return {
        "url": url, "model": model, "clients": clients, "max_tokens": max_tokens,
        "disconnect_fraction": disconnect_fraction,
        "accepted": len(accepted), "rejected_429": len(rejected), "other_status": len(other),
        "completed_exactly_once_full_tokens": len(complete), "broken_streams": len(broken),
        "disconnected_mid_stream": len(disconnected),
        "rejected_with_retry_after": sum(r.retry_after is not None for r in rejected),
        "wall_s": round(wall, 3), "completed_tokens_per_s": round(tokens / wall, 1) if wall > 0 else None,
        "ttft_s": _percentiles([r.ttft_s for r in complete if r.ttft_s is not None]),
        "latency_s": _percentiles([r.latency_s for r in complete if r.latency_s is not None]),
        "server_after": {
            "running_slots": after.get("ltr_jax_running_slots"), "queue_length": after.get("ltr_jax_queue_length"),
            "finished_length": delta('ltr_jax_requests_finished_total{reason="length"}'),
            "finished_cancelled": delta('ltr_jax_requests_finished_total{reason="cancelled"}'),
            "generated_tokens": delta("ltr_jax_generated_tokens_total"),
        },
        "examples_broken": [asdict(r) for r in broken[:3]],
        "examples_other": [asdict(r) for r in other[:3]],
        "clients_detail": [asdict(r) for r in results],
    }


def run_load_test(url: str, **kwargs) -> dict:
    return asyncio.run(run_load_test_async(url, **kwargs))


def load_test_ok(summary: dict) -> bool:
    """The invariants: every accepted, non-disconnected stream completed exactly once with every token; nothing
    but 200/429; no request left queued or running afterwards."""
    finished = summary["accepted"] - summary["disconnected_mid_stream"]
    return (summary["completed_exactly_once_full_tokens"] == finished and summary["other_status"] == 0
            and summary["server_after"]["running_slots"] == 0 and summary["server_after"]["queue_length"] == 0)
