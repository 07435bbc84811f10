"""Discrete-event simulator: replays a trace through a real `Scheduler` against a step-time model.

It follows the engine's loop exactly, with modelled time: at each batch boundary ``schedule(now)``; preempted
requests lose their slot; each admitted request is prefilled in order (``prefill_time(context_len)``, yields one
token), except a resumed one under ``preempt_mode="swap"`` (the orchestrator's default), whose K/V was kept: it
is inserted at no modelled cost and gets its next token from the decode step (under ``"recompute"`` a resume
re-prefills its whole context, and pays for it; the simulator's swap space is unbounded); then one decode step over all
running requests (``decode_time(batch, tokens_in_cache)``, one token each); requests that reach their output
length finish at that token's time. Arrivals are added at the first boundary at or after their arrival time
(their TTFT clock still starts at the arrival); when nothing is queued or running, time jumps to the next arrival.

The ranker's cost (optional ``ranker_time``): when the policy ranks (`Policy.uses_ranker`), each arrival's
ranker pass runs at the boundary where it arrives, before the schedule, as in the engine, and delays everyone
already running. With ``ranker_reuse`` that pass is the first part of the request's prefill (the ranker's backbone is
the served model's first blocks and the engine keeps its K/V), so the first prefill then costs the difference. On
a 2-core CPU serving SmolLM2 the pass is about half a prefill; this front-loaded work is the part of ltr's gap to
an overhead-free oracle that better ranking cannot close.

The command line over it is ``python -m ltr_jax.bench simulate`` (rates, policies, step-time models, reports).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from ltr_jax.engine.preemption import PREEMPT_MODES
from ltr_jax.scheduler.metrics import summarize
from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.request import Request
from ltr_jax.scheduler.scheduler import Scheduler, StarvationConfig
from ltr_jax.sim.step_time import StepTimeModel
from ltr_jax.sim.trace import TraceEntry


@dataclass
class SimResult:
    records: list[Request]
    sim_time_s: float  # modelled time at the end
    wall_s: float  # real seconds the simulation took
    iterations: int
    max_iteration_s: float  # longest boundary-to-boundary iteration (prefills + decode)
    max_prefill_phase_s: float  # longest run of prefills at one boundary
    num_preemptions: int
    num_promotions: int
    extra: dict = field(default_factory=dict)


def requests_from_trace(trace: Sequence[TraceEntry]) -> list[Request]:
    reqs = []
    for i, entry in enumerate(trace):
        if entry.output_len < 1:
            raise ValueError(f"trace entry {i}: output_len must be >= 1 (a prefill always yields a token)")
        reqs.append(
            Request(
                request_id=f"req-{i}",
                arrival_time=float(entry.arrival_time),
                prompt_len=int(entry.prompt_len),
                max_tokens=int(entry.output_len),
                score=float(entry.score),
                true_output_len=int(entry.output_len),
                bucket=int(entry.bucket),
            )
        )
    reqs.sort(key=lambda r: r.arrival_time)  # stable: equal arrivals keep trace order
    return reqs


def simulate(
    trace: Sequence[TraceEntry],
    scheduler: Scheduler,
    step_model: StepTimeModel,
    on_boundary: Callable[[Scheduler, float], None] | None = None,
    preempt_mode: str = "swap",
    ranker_time: Callable[[int], float] | None = None,
    ranker_reuse: bool = False,
) -> SimResult:
    """Run ``trace`` to completion through ``scheduler``. ``on_boundary(scheduler, now)`` (optional) is called
    right after every ``schedule`` call, e.g. to check invariants. ``preempt_mode``: how a preempted request
    resumes, "swap" (its K/V was kept) or "recompute" (re-prefill of prompt + generated tokens).
    ``ranker_time(prompt_len)``: seconds of the ranker's pass over one arriving prompt, charged when the policy
    ranks (None: ranking is free); ``ranker_reuse``: that pass is the start of the prompt's first prefill."""
    if preempt_mode not in PREEMPT_MODES:
        raise ValueError(f"preempt_mode must be one of {', '.join(PREEMPT_MODES)}, got {preempt_mode!r}")
    swap = preempt_mode == "swap"
    if not scheduler.policy.uses_ranker:
        ranker_time = None
    ranked_pass: dict[int, float] = {}  # id(request) -> its ranker pass (seconds), until its first prefill
    ranker_s = 0.0
    idle_s = 0.0
    wall_start = time.perf_counter()
    reqs = requests_from_trace(trace)
    n = len(reqs)
    prefill_time = step_model.prefill_time
    decode_time = step_model.decode_time
    on_token = scheduler.on_token
    finish = scheduler.finish
    running = scheduler._running  # read-only use: iterate a snapshot each step
    now = reqs[0].arrival_time if reqs else 0.0
    next_arrival = 0
    done = 0
    iterations = 0
    max_iteration = 0.0
    max_prefill_phase = 0.0
    while done < n:
        boundary = now  # arrivals during this boundary's ranker passes wait for the next one, as in the engine
        while next_arrival < n and reqs[next_arrival].arrival_time <= boundary:
            req = reqs[next_arrival]
            if ranker_time is not None:
                cost = ranker_time(req.prompt_len)
                now += cost
                ranker_s += cost
                if ranker_reuse:
                    ranked_pass[id(req)] = cost
            scheduler.add(req, now)
            next_arrival += 1
        if not running and scheduler.num_waiting == 0:
            idle_s += reqs[next_arrival].arrival_time - now
            now = reqs[next_arrival].arrival_time
            continue
        start = now
        decision = scheduler.schedule(now)
        if on_boundary is not None:
            on_boundary(scheduler, now)
        for req in decision.admit:
            if swap and req.generated:
                continue  # its cache was kept: the decode step below yields its next token
            now += max(prefill_time(req.context_len) - ranked_pass.pop(id(req), 0.0), 0.0)
            on_token(req, now)
            if req.generated >= req.true_output_len:
                finish(req, now)
                done += 1
        prefill_phase = now - start
        if running:
            batch = list(running)
            cache_tokens = 0
            for req in batch:
                cache_tokens += req.prompt_len + req.generated
            now += decode_time(len(batch), cache_tokens)
            for req in batch:
                on_token(req, now)
                if req.generated >= req.true_output_len:
                    finish(req, now)
                    done += 1
        elif not decision.admit:
            raise RuntimeError(f"simulator stalled at t={now}: requests are waiting but none was admitted")
        iterations += 1
        max_iteration = max(max_iteration, now - start)
        max_prefill_phase = max(max_prefill_phase, prefill_phase)
    return SimResult(
        records=reqs,
        sim_time_s=now,
        wall_s=time.perf_counter() - wall_start,
        iterations=iterations,
        max_iteration_s=max_iteration,
        max_prefill_phase_s=max_prefill_phase,
        num_preemptions=scheduler.num_preemptions,
        num_promotions=scheduler.num_promotions,
        extra={"busy_s": now - (reqs[0].arrival_time if reqs else 0.0) - idle_s,
               **({"ranker_s": ranker_s} if ranker_time is not None else {})},
    )


def _ranker_time(cost: float, step_model: StepTimeModel, prompt_len: int) -> float:
    return cost * step_model.prefill_time(prompt_len)


def simulate_policy(trace: Sequence[TraceEntry], name: str, params: dict, starvation: StarvationConfig | None,
                    slots: int, step_model: StepTimeModel, preempt_mode: str = "swap", ranker_cost: float = 0.0,
                    ranker_reuse: bool = False) -> dict[str, Any]:
    """One benchmark run: policy ``name`` (``make_policy`` with ``params``; ``starvation`` control or None) on
    ``slots`` slots over ``trace``, the ranker's pass costing ``ranker_cost`` of a prefill; returns the summary a
    report shows (`summarize`, plus completions, simulation seconds, ranker overhead and sorted latencies). Its
    arguments pickle, so a worker process can run it (`python -m ltr_jax.bench simulate --jobs`)."""
    sched = Scheduler(make_policy(name, **params), slots, starvation=starvation)
    ranker_time = partial(_ranker_time, ranker_cost, step_model) if ranker_cost > 0 else None
    result = simulate(trace, sched, step_model, preempt_mode=preempt_mode, ranker_time=ranker_time,
                      ranker_reuse=ranker_reuse)
    s = summarize(result.records)
    s["completed"] = s["num_finished"]
    s["sim_wall_s"] = round(result.wall_s, 2)
    s["ranker_seconds"] = round(result.extra.get("ranker_s", 0.0), 3)
    if s["ranker_seconds"]:
        s["ranker_ms_per_request"] = 1000 * s["ranker_seconds"] / len(result.records)
        s["ranker_share_of_busy_time"] = s["ranker_seconds"] / max(result.extra["busy_s"], 1e-12)
        s["reused_ranker_passes"] = len(result.records) if ranker_reuse else 0
    if starvation is not None and starvation.rule == "threshold":
        s["starvation_threshold_s"] = starvation.threshold_s
    s["latencies_s"] = sorted(round(r.latency, 3) for r in result.records if r.latency is not None)
    return s
