"""Command-line options shared by `bench run` (real engine) and `bench simulate` (discrete-event simulator).

Owns the policy names and the options both commands take in the same sense, so the two reports stay comparable:
policies, request rates, gamma CV, the preemption cap and resume mode, starvation control, seed and output directory.
"""

from __future__ import annotations

import argparse
import math
from typing import Any

from ltr_jax.engine.preemption import PREEMPT_MODES
from ltr_jax.scheduler.scheduler import StarvationConfig

POLICIES = ("fcfs", "ltr", "ltr+starvation", "ltr-rescore", "classify", "oracle-sjf", "oracle-srtf")
DEFAULT_POLICIES = "fcfs,ltr,ltr+starvation,classify,oracle-sjf"


def add_shared_options(p: argparse.ArgumentParser, *, rates: str, starvation_threshold: float,
                       starvation_quantum: float) -> None:
    p.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated, from {', '.join(POLICIES)}")
    p.add_argument("--rates", default=rates, help="comma-separated Poisson/gamma request rates (req/s)")
    p.add_argument("--cv", type=float, default=2.0, help="coefficient of variation of gamma inter-arrival times")
    p.add_argument("--max-preemptions", type=int, default=0, help="per request, for every preemptive policy "
                   "(0 = the policy never displaces a running request; starvation promotions still may): in the "
                   "simulator allowing displacements did not lower mean latency, with or without kept K/V")
    p.add_argument("--preempt-mode", default="swap", choices=PREEMPT_MODES,
                   help="how a preempted request resumes: 'swap' keeps its K/V and continues where it stopped; "
                   "'recompute' re-prefills its prompt and every token it produced")
    p.add_argument("--starvation-threshold", type=threshold_arg, default=starvation_threshold,
                   help="seconds a request may wait (before its first token, or between tokens) before "
                   "ltr+starvation promotes it; or 'fcfs': the worst max_waiting_time of this invocation's fcfs "
                   "run at the same rate (nobody should wait longer than FCFS's worst case)")
    p.add_argument("--starvation-quantum", type=float, default=starvation_quantum,
                   help="seconds a promoted request keeps its priority (ltr+starvation)")
    p.add_argument("--starvation-requeue", action=argparse.BooleanOptionalAction,
                   default=StarvationConfig.requeue_after_quantum,
                   help="when a promoted request's quantum ends it is back in rank order, and a better-ranked "
                   "waiting request may take its slot (it resumes later); off: a promotion runs it to its end")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals, prompt sampling and sampling")
    p.add_argument("--out", default=None, help="directory for report.json, report.md and PNG plots")


def threshold_arg(text: str) -> float | str:
    if text == "fcfs":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of seconds nor 'fcfs'") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be > 0 seconds, got {text}")
    return value


def resolve_threshold(args: argparse.Namespace, results: dict[str, Any]) -> float:
    """The starvation threshold for this rate: the number given, or the fcfs run's worst max_waiting_time."""
    if args.starvation_threshold != "fcfs":
        return float(args.starvation_threshold)
    worst = results["fcfs"]["max_waiting_time_s"]["max"]
    return max(math.ceil(worst * 10) / 10, 0.1)


def check_policies(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    policies = args.policies.split(",")
    bad = [x for x in policies if x not in POLICIES]
    if bad:
        p.error(f"unknown policies {bad}; choose from {', '.join(POLICIES)}")
    if args.max_preemptions < 0:
        p.error(f"--max-preemptions must be >= 0, got {args.max_preemptions}")
    if not args.starvation_quantum > 0:
        p.error(f"--starvation-quantum must be > 0 seconds, got {args.starvation_quantum}")
    if (args.starvation_threshold == "fcfs" and "ltr+starvation" in policies
            and ("fcfs" not in policies or policies.index("fcfs") > policies.index("ltr+starvation"))):
        p.error("--starvation-threshold fcfs needs fcfs listed before ltr+starvation in --policies")
