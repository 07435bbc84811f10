"""Discrete-event simulator: replays a trace through a real `Scheduler` against a step-time model.

It follows the engine's loop exactly, with modelled time: at each batch boundary ``schedule(now)``; preempted
requests lose their slot (a later resume re-prefills their whole context, and pays for it); each admitted
request is prefilled in order (``prefill_time(context_len)``, yields one token); then one decode step over all
running requests (``decode_time(batch, tokens_in_cache)``, one token each); requests that reach their output
length finish at that token's time. Arrivals are added at the first boundary at or after their arrival time
(their TTFT clock still starts at the arrival); when nothing is queued or running, time jumps to the next arrival.

CLI: ``python -m ltr_jax.scheduler.sim --rate 64 --n 10000 --policy fcfs,ltr,oracle-sjf`` prints a JSON summary
per policy and the mean-latency ratios against FCFS.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .metrics import summarize
from .policies import POLICY_NAMES, make_policy, policy_parameters
from .request import Request
from .scheduler import Scheduler, StarvationConfig
from .step_time import AnalyticStepTime, MeasuredStepTime, StepTimeModel
from .trace import ARRIVAL_PROCESSES, TraceEntry, load_lengths, make_trace


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
) -> SimResult:
    """Run ``trace`` to completion through ``scheduler``. ``on_boundary(scheduler, now)`` (optional) is called
    right after every ``schedule`` call, e.g. to check invariants."""
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
        while next_arrival < n and reqs[next_arrival].arrival_time <= now:
            scheduler.add(reqs[next_arrival], now)
            next_arrival += 1
        if not running and scheduler.num_waiting == 0:
            now = reqs[next_arrival].arrival_time
            continue
        start = now
        decision = scheduler.schedule(now)
        if on_boundary is not None:
            on_boundary(scheduler, now)
        for req in decision.admit:
            now += prefill_time(req.context_len)
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
    )


# ---------------------------------------------------------------------- CLI
def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m ltr_jax.scheduler.sim",
        description="Simulate scheduling policies on a trace with a modelled accelerator; prints JSON.",
    )
    p.add_argument("--policy", default="fcfs,ltr,oracle-sjf",
                   help=f"comma-separated policies among {', '.join(POLICY_NAMES)}")
    p.add_argument("--rate", type=float, default=64.0, help="arrival rate, requests/s")
    p.add_argument("--n", type=int, default=10000, help="number of requests")
    p.add_argument("--arrival", choices=ARRIVAL_PROCESSES, default="poisson")
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of gamma inter-arrival gaps")
    p.add_argument("--labels", default=None,
                   help="JSONL with output_tokens/output_len per line (default: shared prompts' reference lengths)")
    p.add_argument("--prompts", default=None, help="prompts JSONL (default: ../shared/data/prompts.jsonl)")
    p.add_argument("--tau", type=float, default=0.55, help="target Kendall tau of the synthetic ranker scores")
    p.add_argument("--buckets", type=int, default=8, help="classes for the classify policy")
    p.add_argument("--slots", type=int, default=256, help="batch slots (max running requests)")
    p.add_argument("--max-prefill-tokens", type=int, default=None)
    p.add_argument("--starvation-threshold", type=float, default=0.0, help="seconds; 0 disables starvation control")
    p.add_argument("--quantum", type=float, default=1.0, help="promotion quantum, seconds")
    p.add_argument("--max-preemptions", default=None,
                   help="per-request preemption cap for preemptive policies ('none' = unlimited)")
    p.add_argument("--step-model", default="llama3-8b-h100",
                   help="'llama3-8b-h100' (analytic roofline) or a JSON file of measured step times")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the JSON here")
    return p.parse_args(argv)


def _step_model(spec: str) -> tuple[StepTimeModel, str]:
    if spec == "llama3-8b-h100":
        return AnalyticStepTime.for_llama3_8b_h100(), "analytic roofline, Llama-3-8B bf16 on one H100 SXM"
    return MeasuredStepTime.from_json(spec), f"least-squares fit of measured step times in {spec}"


def run_policies(args: argparse.Namespace) -> dict:
    policies = [name.strip() for name in args.policy.split(",") if name.strip()]
    for name in policies:
        make_policy(name)  # validates the name before any work
    pairs, length_source = load_lengths(args.labels, args.prompts)
    trace, trace_info = make_trace(pairs, args.n, args.rate, args.arrival, args.cv, args.tau, args.buckets,
                                   args.seed)
    step_model, step_desc = _step_model(args.step_model)
    starvation = (StarvationConfig(args.starvation_threshold, args.quantum)
                  if args.starvation_threshold > 0 else None)
    results: dict[str, dict] = {}
    for name in policies:
        params = {}
        if args.max_preemptions is not None and "max_preemptions" in policy_parameters(name):
            params["max_preemptions"] = None if args.max_preemptions.lower() == "none" else int(args.max_preemptions)
        policy = make_policy(name, **params)
        scheduler = Scheduler(policy, args.slots, starvation=starvation, max_prefill_tokens=args.max_prefill_tokens)
        result = simulate(trace, scheduler, step_model)
        summary = summarize(result.records)
        summary["policy"] = policy.describe()
        summary["sim_wall_s"] = round(result.wall_s, 3)
        summary["iterations"] = result.iterations
        results[name] = summary
    ratios = {}
    for metric in ("latency_s", "normalized_latency_s_per_token"):
        base = results.get("fcfs")
        if base is None:
            break
        for other in results:
            if other != "fcfs":
                denominator = results[other][metric]["mean"]
                ratios[f"mean {metric} fcfs/{other}"] = (
                    base[metric]["mean"] / denominator if denominator > 0 else math.nan
                )
    return {
        "lengths": length_source,
        "trace": trace_info,
        "step_model": step_desc,
        "slots": args.slots,
        "max_prefill_tokens": args.max_prefill_tokens,
        "starvation": None if starvation is None else {"threshold_s": starvation.threshold_s,
                                                        "quantum_s": starvation.quantum_s},
        "ratios": ratios,
        "policies": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        report = run_policies(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
