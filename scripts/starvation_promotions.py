"""Why `fcfs-slack` promotes the requests it promotes, on one `bench simulate` trace (issue 27).

Builds the trace `python -m ltr_jax.bench simulate` builds for ``--seed`` and ``--rate`` (the same arguments: pass
``--ranker``, ``--prompts``, ``--lengths`` for AlpacaEval lengths, nothing for the default trace lengths), runs fcfs,
ltr and ltr+starvation through the real `Scheduler`, and prints for ltr+starvation:

* promotions per request, distinct requests promoted per request, first-token promotions against promotions of a
  request that already had tokens, and how many requests were promoted once / twice;
* the bound's FCFS-delay part (the peak `promotion_wait_s` adds the slack to) against the real FCFS delay it
  stands for, the largest TTFT of the fcfs run among the requests that arrived during the promoted request's wait,
  per 50 s of the run;
* promotions by score class (0: the lowest scores, the longest predicted);
* the three points of the issue (gain kept, worst wait against fcfs's worst + slack, promotions per request).

    PYTHONPATH=. python scripts/starvation_promotions.py --ranker ltr_jax/data/ranker_alpacaeval_llama3_8b \
        --prompts ../shared/data/alpacaeval_llama3.jsonl --lengths outputs.llama3-8b --rate 32 --seed 6
"""

from __future__ import annotations

import argparse
import bisect
import collections
import sys
from functools import partial

import numpy as np

from ltr_jax.bench import simulate as bench_simulate
from ltr_jax.bench.options import resolve_threshold, starvation_config
from ltr_jax.scheduler.policies import make_policy, policy_parameters
from ltr_jax.scheduler.scheduler import Scheduler
from ltr_jax.sim.simulator import _ranker_time, simulate
from ltr_jax.sim.step_time import AnalyticStepTime
from ltr_jax.sim.trace import load_lengths, make_trace


class LoggingScheduler(Scheduler):
    """A `Scheduler` that records each fcfs-slack promotion: when, the request's wait then, the bound, its class."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.log: list[dict] = []

    def _promote(self, req, now: float) -> None:
        first = req.generated == 0
        wait_start = req.arrival_time if first else req._wait_entry[0]
        bound = self.promotion_wait_s(now) if self._fcfs_slack else float("nan")
        delay = self._delay_peaks[0][1] if self._fcfs_slack else float("nan")  # the bound's FCFS-delay part
        k = self._work_model.score_class(req.score)
        super()._promote(req, now)
        self.log.append({"t": now, "seq": req._seq, "n": req.promotions, "first": first, "wait_start": wait_start,
                         "bound": bound, "delay": delay, "cls": k, "to_end": req._runs_to_end, "learner": req._learner})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranker")
    p.add_argument("--prompts")
    p.add_argument("--lengths")
    p.add_argument("--rate", type=float, default=32.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="a config key=value, as `bench simulate --set`")
    a = p.parse_args()
    argv = ["--rates", f"{a.rate:g}", "--seed", str(a.seed), "--jobs", "1"]
    for flag in ("ranker", "prompts", "lengths"):
        if getattr(a, flag):
            argv += [f"--{flag}", getattr(a, flag)]
    for item in a.set:
        argv += ["--set", item]
    args = bench_simulate.parse_args(argv)
    if args.ranker:
        pairs, scores, _, measured = bench_simulate.ranked_held_out_prompts(args.ranker, args.prompts, args.lengths)
        tau = measured["kendall_tau_b"]
    else:
        (pairs, _), scores = load_lengths(args.labels, args.prompts), None
        tau = args.tau if args.tau is not None else bench_simulate.default_tau()[0]
    trace, _ = make_trace(pairs, args.n, a.rate, args.arrival, args.cv, tau, args.buckets, args.seed,
                          scores_of_pairs=scores)
    step = AnalyticStepTime.for_llama3_8b_h100()
    ranker_time = partial(_ranker_time, bench_simulate.RANKER_SHARE_OF_LLAMA3_8B, step)
    runs = {}
    for policy in ("fcfs", "ltr", "ltr+starvation"):
        name = "ltr" if policy == "ltr+starvation" else policy
        params = {"max_preemptions": args.max_preemptions} if "max_preemptions" in policy_parameters(name) else {}
        starvation = starvation_config(args, resolve_threshold(args, {})) if policy == "ltr+starvation" else None
        sched = LoggingScheduler(make_policy(name, **params), args.slots, starvation=starvation)
        result = simulate(trace, sched, step, preempt_mode=args.preempt_mode, ranker_time=ranker_time,
                          ranker_reuse=args.ranker_reuse)
        runs[policy] = (result, sched)
    fcfs = sorted(runs["fcfs"][0].records, key=lambda r: r.arrival_time)
    arrivals = [r.arrival_time for r in fcfs]
    ttfts = np.array([r.ttft for r in fcfs])
    mean = {k: float(np.mean([r.latency for r in v[0].records])) for k, v in runs.items()}
    worst = {k: max(r.max_waiting_time for r in v[0].records) for k, v in runs.items()}
    n = len(trace)
    log = runs["ltr+starvation"][1].log
    per_request = collections.Counter(x["seq"] for x in log)
    print(f"seed {a.seed}, {a.rate:g} req/s, {n} requests")
    print(f"promotions per request {len(log) / n:.4f}; distinct requests promoted {len(per_request) / n:.4f}; "
          f"first-token promotions {sum(x['first'] for x in log)}, of requests that had tokens "
          f"{sum(not x['first'] for x in log)}; requests by times promoted "
          f"{sorted(collections.Counter(per_request.values()).items())}; set to run to their end "
          f"{sum(x['to_end'] for x in log)} (learners {sum(x['learner'] for x in log)})")
    err = []
    for x in log:  # the bound's FCFS-delay part against fcfs's largest TTFT among arrivals during the wait
        i0, i1 = bisect.bisect_left(arrivals, x["wait_start"]), bisect.bisect_right(arrivals, x["t"])
        if i1 > i0:
            err.append((x["t"], x["delay"] - float(ttfts[i0:i1].max())))
    e = np.array(err)
    print(f"bound's FCFS delay - fcfs's largest TTFT of the arrivals during the wait: mean {e[:, 1].mean():+.1f} s, "
          f"p10 {np.percentile(e[:, 1], 10):+.1f}, p90 {np.percentile(e[:, 1], 90):+.1f}")
    times = np.array([x["t"] for x in log])
    for lo in range(0, int(times.max()) + 50, 50):
        m = (times >= lo) & (times < lo + 50)
        me = (e[:, 0] >= lo) & (e[:, 0] < lo + 50)
        if m.any():
            firsts = sum(log[i]["first"] for i in np.nonzero(m)[0])
            print(f"  t {lo:4d}-{lo + 50:4d} s: {int(m.sum()):5d} promotions ({firsts} first-token), bound's "
                  f"error {e[me, 1].mean() if me.any() else float('nan'):+6.1f} s")
    print("by score class (0 = longest predicted):",
          sorted(collections.Counter(x["cls"] for x in log).items()), "; second promotions:",
          sorted(collections.Counter(x["cls"] for x in log if x["n"] >= 2).items()))
    slack = runs["ltr+starvation"][1].starvation.slack_for(worst["fcfs"])
    past = np.mean([r.max_waiting_time > worst["fcfs"] + slack for r in runs["ltr"][0].records])
    kept = (mean["fcfs"] - mean["ltr+starvation"]) / (mean["fcfs"] - mean["ltr"])
    print(f"ltr alone leaves {100 * past:.1f}% of requests past fcfs's worst + slack; rule keeps {100 * kept:.1f}% "
          f"of ltr's gain, worst wait {worst['ltr+starvation']:.1f} s against {worst['fcfs'] + slack:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
