"""Decision-time benchmark: how long one ``Scheduler.schedule`` call takes with ~10k requests waiting.

Each policy runs a steady-state loop: ``num_slots`` running requests produce a token per step (10 ms of modelled
time), those reaching their length finish, as many new requests arrive as finished (so ~``num_waiting`` keep
waiting), and the ``schedule(now)`` call is timed. With starvation control on, the waiting requests' arrivals
are spread over one threshold (or slack) so promotions trickle in every step (the promotion path is timed
too), under either rule.

``python -m ltr_jax.sim.decision_bench`` prints JSON (microseconds per decision, per policy).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Sequence

from ltr_jax.scheduler.policies import POLICY_NAMES, make_policy
from ltr_jax.scheduler.request import Request
from ltr_jax.scheduler.scheduler import Scheduler, StarvationConfig

STEP_S = 0.01


def _new_request(rng: random.Random, i: int, arrival: float) -> Request:
    length = max(1, int(rng.lognormvariate(4.5, 1.0)))
    return Request(
        f"b{i}",
        arrival,
        prompt_len=rng.randint(8, 512),
        max_tokens=length,
        score=-(rng.gauss(0.0, 1.0) + 0.5 * (length**0.5)),
        true_output_len=length,
        bucket=min(7, length // 64),
    )


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def _stats(sorted_values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(sorted_values), 2),
        "p50": round(_percentile(sorted_values, 0.5), 2),
        "p99": round(_percentile(sorted_values, 0.99), 2),
        "max": round(sorted_values[-1], 2),
    }


def benchmark_policy(
    name: str,
    num_waiting: int = 10_000,
    num_slots: int = 64,
    decisions: int = 2000,
    starvation: StarvationConfig | None = None,
    seed: int = 0,
) -> dict:
    rng = random.Random(seed)
    sched = Scheduler(make_policy(name), num_slots, starvation=starvation)
    if starvation is None:
        spread = 1.0
    else:
        spread = starvation.threshold_s if starvation.rule == "threshold" else starvation.slack_s
    now = spread
    next_id = 0
    for _ in range(num_waiting + num_slots):
        sched.add(_new_request(rng, next_id, rng.uniform(0.0, spread)), now)
        next_id += 1
    sched.schedule(now)
    schedule_ns: list[int] = []
    schedule_cpu_ns: list[int] = []
    finish_ns: list[int] = []
    tokens = 0
    token_ns = 0
    for _ in range(decisions):
        now += STEP_S
        running = sched.running
        t0 = time.perf_counter_ns()
        for r in running:
            sched.on_token(r, now)
        token_ns += time.perf_counter_ns() - t0
        tokens += len(running)
        done = [r for r in running if r.generated >= r.true_output_len]
        for r in done:
            t0 = time.perf_counter_ns()
            sched.finish(r, now)
            finish_ns.append(time.perf_counter_ns() - t0)
        for _ in range(len(done)):
            sched.add(_new_request(rng, next_id, now), now)
            next_id += 1
        t0 = time.perf_counter_ns()
        c0 = time.thread_time_ns()
        sched.schedule(now)
        schedule_cpu_ns.append(time.thread_time_ns() - c0)
        schedule_ns.append(time.perf_counter_ns() - t0)
    us = sorted(v / 1000 for v in schedule_ns)
    cpu_us = sorted(v / 1000 for v in schedule_cpu_ns)
    finish_us = sorted(v / 1000 for v in finish_ns) or [0.0]
    return {
        "decisions": decisions,
        "waiting_mean": num_waiting,
        "num_slots": num_slots,
        "decision_us": _stats(us),
        "decision_cpu_us": _stats(cpu_us),
        "on_token_us_mean": round(token_ns / 1000 / max(tokens, 1), 3),
        "finish_us": {"mean": round(statistics.fmean(finish_us), 2), "max": round(finish_us[-1], 2)},
        "preemptions": sched.num_preemptions,
        "promotions": sched.num_promotions,
        "waiting_at_end": sched.num_waiting,
    }


def benchmark_decision_time(
    policies: Sequence[str] = POLICY_NAMES,
    num_waiting: int = 10_000,
    num_slots: int = 64,
    decisions: int = 2000,
    starvation_threshold_s: float = 5.0,
    quantum_s: float = 1.0,
) -> dict:
    """Per-policy decision times, without and with starvation control."""
    results: dict[str, dict] = {}
    for name in policies:
        results[name] = {
            "starvation_off": benchmark_policy(name, num_waiting, num_slots, decisions, None),
            "starvation_threshold": benchmark_policy(
                name, num_waiting, num_slots, decisions,
                StarvationConfig(rule="threshold", threshold_s=starvation_threshold_s, quantum_s=quantum_s)
            ),
            "starvation_fcfs_slack": benchmark_policy(
                name, num_waiting, num_slots, decisions,
                StarvationConfig(slack_s=starvation_threshold_s, quantum_s=quantum_s)
            ),
        }
    return {
        "what": "time of one Scheduler.schedule() call with ~num_waiting requests waiting (microseconds): "
        "decision_us is wall-clock, decision_cpu_us is this thread's CPU time (immune to other processes "
        "taking the core)",
        "num_waiting": num_waiting,
        "num_slots": num_slots,
        "starvation": {"threshold_s (threshold) = slack_s (fcfs-slack)": starvation_threshold_s,
                       "quantum_s": quantum_s, "step_s": STEP_S},
        "policies": results,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.sim.decision_bench", description=__doc__)
    p.add_argument("--policy", default=",".join(POLICY_NAMES))
    p.add_argument("--waiting", type=int, default=10_000)
    p.add_argument("--slots", type=int, default=64)
    p.add_argument("--decisions", type=int, default=2000)
    args = p.parse_args(argv)
    policies = [n.strip() for n in args.policy.split(",") if n.strip()]
    for name in policies:
        make_policy(name)
    print(json.dumps(benchmark_decision_time(policies, args.waiting, args.slots, args.decisions), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
