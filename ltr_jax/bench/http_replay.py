"""The policy benchmark through the HTTP server: `python -m ltr_jax.bench run --via http`.

Owns the HTTP leg of the benchmark. For one policy, `run_over_http` wraps the benchmark's engine, that policy's
scheduler and the ranker in a server `Runtime` (the same FastAPI app and orchestrator `python -m ltr_jax.serve`
runs), serves it on a loopback port from a thread of this process, and `replay` sends each request of the workload
at its arrival time as a streaming ``/v1/completions`` call (the prompt as token ids, ``max_tokens`` = its replayed
length, ``ignore_eos``), recording on the client side when each chunk arrived. Latencies then include the HTTP
and server-sent-event path, as a client of the server sees it.

Times are per chunk: the server writes the tokens it has ready in one chunk, so the first chunk's arrival is the
TTFT a client sees and a gap between chunks is an inter-token gap as the client sees it; the token count comes
from the stream's closing usage record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from ltr_jax.bench.workload import Item, Observed
from ltr_jax.engine.orchestrator import Orchestrator
from ltr_jax.server.loadgen import error_message, stream_events


class ReplayOrchestrator(Orchestrator):
    """The orchestrator of an HTTP replay. Every request of a replay generates exactly its ``max_tokens``
    (``ignore_eos``), so the oracle policies may know that length, as they do when the benchmark submits in-process
    (`Orchestrator.submit`'s ``true_output_len``); the HTTP API has no field for it."""

    def submit(self, prompt_tokens, sampling, on_event, request_id=None, timeout_s=None, true_output_len=None):
        if true_output_len is None and sampling.ignore_eos:
            true_output_len = sampling.max_tokens
        return super().submit(prompt_tokens, sampling, on_event, request_id=request_id, timeout_s=timeout_s,
                              true_output_len=true_output_len)


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any], ob: Observed) -> None:
    """Stream one completion into ``ob``; a refused or broken request keeps ``reason`` saying why."""
    ob.sent = time.monotonic()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                ob.reason = f"HTTP {resp.status_code}: {await error_message(resp)}"
                return
            async for obj in stream_events(resp):
                if obj is None:  # data: [DONE]
                    continue
                now = time.monotonic()
                if "error" in obj:
                    ob.reason = f"error: {obj['error'].get('message')}"
                    continue
                if obj.get("usage"):
                    ob.tokens = obj["usage"]["completion_tokens"]
                for choice in obj.get("choices", []):
                    if choice.get("text"):
                        ob.token_times.append(now)
                    if choice.get("finish_reason"):
                        ob.finish, ob.reason = now, choice["finish_reason"]
                        if not ob.token_times:  # nothing visible came before the end: the client saw it all now
                            ob.token_times.append(now)
    except httpx.HTTPError as err:
        ob.reason = f"{type(err).__name__}: {err}"


async def replay(url: str, model: str, items: list[Item], arrivals: np.ndarray, temperature: float, seed: int,
                 sequential: bool = False, budget: float | None = None, target: int | None = None,
                 bar: tqdm | None = None) -> tuple[list[Observed], float, float | None]:
    """Send ``items`` at ``arrivals`` (seconds from start); returns (what each client saw, wall seconds, seconds
    until ``target`` completions or None). ``sequential`` waits for each answer before the next request; a
    ``budget`` or a reached ``target`` hangs up on the requests still running (the server cancels them)."""
    observed = [Observed(0.0, item.output_len) for item in items]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(None, connect=30.0)) as client:
        loop_t0 = time.monotonic()
        reached: list[float] = []
        enough = asyncio.Event()

        async def one(i: int) -> None:
            observed[i].submit = time.monotonic() if sequential else loop_t0 + float(arrivals[i])
            body = {"model": model, "prompt": items[i].prompt_tokens, "max_tokens": items[i].output_len,
                    "temperature": temperature, "seed": seed + i, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            await _one(client, url, body, observed[i])
            if bar is not None:
                bar.update(1)
            if target and not reached and sum(o.reason == "length" for o in observed) >= target:
                reached.append(time.monotonic() - loop_t0)
                enough.set()

        tasks: list[asyncio.Task] = []

        async def send_all() -> None:
            for i, at in enumerate(arrivals):
                await asyncio.sleep(max(0.0, loop_t0 + float(at) - time.monotonic()))
                if sequential:
                    await one(i)
                else:
                    tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)

        sender = asyncio.create_task(send_all())
        stopper = asyncio.create_task(enough.wait())
        await asyncio.wait([sender, stopper], timeout=budget, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not sender.done():  # budget spent or target reached: stop sending and hang up on the rest
            for task in (sender, *tasks):
                task.cancel()
            await asyncio.gather(sender, *tasks, return_exceptions=True)
        wall = time.monotonic() - loop_t0
    return observed, wall, (reached[0] if reached else None)


def run_over_http(engine, tokenizer, scheduler, orchestrator_kwargs: dict[str, Any], policy: str, items: list[Item],
                  arrivals: np.ndarray, args, desc: str, sequential: bool = False, budget: float | None = None,
                  target: int | None = None) -> tuple[list[Observed], float, dict[str, Any], float | None]:
    """Serve ``policy`` over HTTP and replay the workload against it; returns (what each client saw, wall seconds,
    the orchestrator's counters, seconds until ``target`` completions or None)."""
    from ltr_jax.config import ServeConfig
    from ltr_jax.server.inprocess import serve_in_thread
    from ltr_jax.server.metrics import ServerMetrics
    from ltr_jax.server.runtime import Runtime

    model_name = engine.model_config.name
    metrics = ServerMetrics(model=model_name, policy=policy)
    orch = ReplayOrchestrator(engine, tokenizer, scheduler, observer=metrics, **orchestrator_kwargs)
    metrics.attach_stats(orch.stats)
    config = ServeConfig()
    config.server = dataclasses.replace(config.server, max_queue=len(items) + 1, request_timeout_s=None)
    runtime = Runtime(config=config, model_name=model_name, tokenizer=tokenizer, engine=engine, orchestrator=orch,
                      metrics=metrics, ranker=orchestrator_kwargs.get("ranking"),
                      ranker_note=f"benchmark replay of policy {policy}")
    bar = tqdm(total=len(items), desc=desc, unit="req", leave=False, disable=not args.progress)
    with serve_in_thread(config, runtime=runtime) as handle:
        observed, wall, reached = asyncio.run(replay(handle.url, model_name, items, arrivals, args.temperature,
                                                     args.seed, sequential=sequential, budget=budget, target=target,
                                                     bar=bar))
    bar.close()
    return observed, wall, orch.stats(), reached
