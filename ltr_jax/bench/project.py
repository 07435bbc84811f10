"""`python -m ltr_jax.bench project RUN_DIR`: what a measured engine would give at other workload sizes and loads.

Owns the choice of a real-engine experiment's size and load before spending an hour on it. From one `bench run`
report it takes the engine's step-time model exactly as `bench resimulate` builds it (unloaded prefill and step,
full-batch step from the fcfs run's busy time), the run's ranker (and classifier) and its ranker cost per request,
and simulates the run's policies on fresh workloads: for every size ``--n`` and load factor, ``--seeds`` workloads
that are the very ones `bench run --n N --seed S` would serve (its prompt sample and Poisson/gamma arrivals), at
the load factor times the modelled capacity. It reports, per size and load, the pooled mean latencies, the ratios
fcfs/ltr and ltr/oracle-sjf pooled over the seeds and their range seed by seed, and FCFS's latency over its
unloaded latency (the issue's "a load that queues" check). A real run of that size on one seed lands somewhere in
that range; how wide it is says how many seeds a real experiment needs.

The modelled capacity is the engine's steady state with every slot busy: one request costs its prefill plus its
output tokens after the first times the full-batch step over the slots, on average over the run's prompt pool.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ltr_jax.bench import policy_bench
from ltr_jax.bench.report import write_summary
from ltr_jax.bench.resimulate import (
    RunStepTime,
    ranker_fraction_of,
    read_run,
    run_scores,
    simulate_mean,
    step_model_of,
    uses_ranker,
)
from ltr_jax.machine import machine_info
from ltr_jax.sim.trace import make_arrivals

STARVATION_POLICY = "ltr+starvation"  # its threshold is set from the fcfs run at the run's own load: not projected


def modelled_capacity(model: RunStepTime, items) -> float:
    """Requests per second with every slot busy, on average over ``items`` (see the module docstring)."""
    per_request = np.mean([model.prefill_time(len(i.prompt_tokens)) + (i.output_len - 1) * model.tpot_full_s
                           / model.slots for i in items])
    return float(1.0 / per_request)


def unloaded_latency(model: RunStepTime, items) -> float:
    """Mean latency of ``items`` each served alone: its prefill, then its other tokens at the one-request step."""
    return float(np.mean([model.prefill_time(len(i.prompt_tokens)) + (i.output_len - 1) * model.tpot_alone_s
                          for i in items]))


def _numbers(text: str, name: str, kind=float) -> list:
    try:
        values = [kind(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"{name} must be comma-separated numbers, got {text!r}") from None
    if not values or not all(v > 0 for v in values):
        raise SystemExit(f"{name} must all be > 0, got {text!r}")
    return values


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.bench project", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("run", help="a directory written by `bench run --out` (a Poisson/gamma run with an unloaded probe "
                   "and an fcfs policy; its model, prompts and ranker must still be at hand)")
    p.add_argument("--n", default=None, help="comma-separated workload sizes (requests per run); default: the run's")
    p.add_argument("--load-factors", default="1,1.5,2", help="comma-separated request rates as multiples of the "
                   "modelled capacity")
    p.add_argument("--seeds", type=int, default=20, help="workloads per size and load: `bench run --seed` 0, 1, ...")
    p.add_argument("--policies", default=None, help="comma-separated; default: the run's policies but "
                   f"{STARVATION_POLICY} (its threshold comes from fcfs at the run's own load)")
    p.add_argument("--out", default=None, help="directory for report.json and report.md (default: print only)")
    args = p.parse_args(argv)
    args.load_factors = _numbers(args.load_factors, "--load-factors")
    args.n = None if args.n is None else _numbers(args.n, "--n", int)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    return args


def project(args: argparse.Namespace) -> dict[str, Any]:
    report, run_args = read_run(Path(args.run))
    if len(report["runs"]) != 1:
        raise SystemExit(f"{args.run}: the run served {len(report['runs'])} rates; project one rate's run (its fcfs "
                         "busy time gives the full-batch step): rerun with one --rates value")
    (runs,) = report["runs"].values()
    policies = args.policies.split(",") if args.policies else [p for p in runs if p != STARVATION_POLICY]
    unknown = [p for p in policies if p not in runs or p == STARVATION_POLICY]
    if unknown:
        raise SystemExit(f"--policies: {', '.join(unknown)} cannot be projected from this run; its policies are "
                         f"{', '.join(runs)} ({STARVATION_POLICY} is never projected: its threshold depends on load)")
    loaded = policy_bench.load_serving_model(run_args.model)

    held_out = policy_bench.held_out_split(policy_bench.workload_rankers(run_args)[0])
    examples = policy_bench.prompt_pool(loaded, run_args.prompts, run_args.lengths, run_args.split,
                                          held_out)

    def items_of(n: int, seed: int):
        return policy_bench.build_items(loaded, run_args.prompts, run_args.lengths, n, run_args.max_prompt_tokens,
                                        run_args.max_output_tokens, run_args.split, seed, run_args.length_scale,
                                        pool=examples, held_out=held_out)[0]

    model = step_model_of(report, runs, items_of(run_args.n, run_args.seed))
    pool = list({i.id: i for i in items_of(len(examples[0]), 0)}.values())  # every prompt it may draw, once
    capacity, alone = modelled_capacity(model, pool), unloaded_latency(model, pool)
    scorers: dict[str, Any] = {}
    cache: dict = {}
    for kind in {("classifier" if p == "classify" else "ranker") for p in policies if uses_ranker(p, report,
                                                                                                 run_args)}:
        run_scores(report, kind, pool, loaded, scorers, cache)  # score the pool once; each workload reads the cache
    rows = []
    for n in args.n or [run_args.n]:
        workloads = [items_of(n, seed) for seed in range(args.seeds)]
        for factor in args.load_factors:
            rate = factor * capacity
            means: dict[str, list[float]] = {p: [] for p in policies}
            for seed, items in enumerate(workloads):
                arrivals = make_arrivals(run_args.arrival, len(items), rate, run_args.cv, seed=seed)
                for policy in policies:
                    ranks = uses_ranker(policy, report, run_args)
                    scores, buckets = run_scores(report, "classifier" if policy == "classify" else "ranker", items,
                                                 loaded, scorers, cache) if ranks \
                        else (np.zeros(len(items)), np.zeros(len(items), int))
                    fraction = ranker_fraction_of(runs[policy], model) if ranks else 0.0
                    means[policy].append(simulate_mean(policy, report, run_args, model, items, arrivals, scores,
                                                       buckets, fraction))
            rows.append(_row(n, factor, rate, means, alone))
            print(_markdown_row(rows[-1]), file=sys.stderr, flush=True)
    return {"benchmark": "projection of a real-engine run", "run": args.run, "run_command": report["command"],
            "step_model": model.__dict__, "pool_prompts": len(pool), "capacity_req_s": capacity,
            "unloaded_latency_s": alone, "seeds": args.seeds, "policies": policies, "rows": rows}


RATIOS = (("fcfs", "ltr"), ("ltr", "oracle-sjf"), ("fcfs", "oracle-sjf"))


def _row(n: int, factor: float, rate: float, means: dict[str, list[float]], alone: float) -> dict[str, Any]:
    row: dict[str, Any] = {"n": n, "load_factor": factor, "rate": rate,
                           "mean_latency_s": {p: float(np.mean(v)) for p, v in means.items()}, "ratios": {}}
    if "fcfs" in means:
        row["fcfs_over_unloaded"] = float(np.mean(means["fcfs"])) / alone
    for num, den in RATIOS:
        if num in means and den in means:
            per_seed = np.array(means[num]) / np.array(means[den])
            row["ratios"][f"{num}/{den}"] = {"pooled": float(np.sum(means[num]) / np.sum(means[den])),
                                             "min": float(per_seed.min()), "median": float(np.median(per_seed)),
                                             "max": float(per_seed.max())}
    return row


HEADER = ("| n | load | rate (req/s) | fcfs / unloaded | " + " | ".join(f"{a}/{b} pooled (min-max)" for a, b in RATIOS)
          + " |")


def _markdown_row(row: dict[str, Any]) -> str:
    cells = [str(row["n"]), f"{row['load_factor']:g}x", f"{row['rate']:.3f}",
             f"{row['fcfs_over_unloaded']:.1f}x" if "fcfs_over_unloaded" in row else ""]
    for num, den in RATIOS:
        r = row["ratios"].get(f"{num}/{den}")
        cells.append(f"{r['pooled']:.2f} ({r['min']:.2f}-{r['max']:.2f})" if r else "")
    return "| " + " | ".join(cells) + " |"


def markdown(result: dict[str, Any]) -> str:
    m = result["step_model"]
    lines = ["# projection of a real-engine run", "",
             (f"Engine model from `{result['run']}`: prefill {m['ttft_s'] * 1000:.0f} ms for a "
              f"{m['mean_prompt_len']:.0f}"
             f"-token prompt, decode step {m['tpot_alone_s'] * 1000:.0f} ms alone and {m['tpot_full_s'] * 1000:.0f} ms"
             f" with all {m['slots']} slots busy; modelled capacity {result['capacity_req_s']:.3f} req/s and "
             f"unloaded latency {result['unloaded_latency_s']:.2f} s over the {result['pool_prompts']} prompts of "
             f"its split; {result['seeds']} workloads (seeds 0-{result['seeds'] - 1}) per size and load."), "",
             HEADER, "|" + "---|" * (4 + len(RATIOS))]
    lines += [_markdown_row(r) for r in result["rows"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    result = project(args)
    result.update(command="python -m ltr_jax.bench project " + " ".join(sys.argv[2:] if argv is None else argv),
                  machine=machine_info(), date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  wall_s=round(time.perf_counter() - t0, 1))
    text = markdown(result)
    write_summary(result, text, args.out)
    print(text)
    return result
