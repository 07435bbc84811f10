"""A simulator proxy of the real-engine starvation runs (`bench run ... --slots 4 --length-scale 0.5
--max-output-tokens 512 --n 300 --load-factors 1.5`), cheap enough to run over many seeds.

It replays the workload `bench run` builds for a seed (the same prompts of the trace ranker's held-out split, in the
same order: the same `numpy` permutation, lengths halved and capped at 512), with the trace ranker's real scores,
through the real `Scheduler` on a step-time model fitted to the 4-slot CPU engine (SmolLM2, bf16 weights, the
Xeon of benchmarks/RESULTS.md): a decode step takes ``--decode-s`` whatever the batch (the engine runs one compiled
shape), a prefill ``0.015 s + 0.7 ms x prompt tokens`` and the ranker's pass 47 ms, which the prefill reuses. The
rate is ``--load-factor`` x the capacity that `bench run` would measure (a burst of the first 64 requests under
fcfs, scaled by their mean output length over the workload's) or ``--rate``. For each seed it prints fcfs / ltr /
ltr+starvation mean latency, the share of ltr's gain kept, the worst max_waiting_time against fcfs's worst + slack
and promotions per request.

    PYTHONPATH=. python scripts/starvation_cpu_proxy.py --seeds 0-59 [--jitter 0.1] [--set run_to_end_share=1.0]

The first run scores the held-out prompts with the ranker (about a minute) and caches them in ``--pool``.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from functools import partial
from pathlib import Path

import numpy as np

from ltr_jax.scheduler.metrics import summarize
from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.scheduler import Scheduler
from ltr_jax.scheduler.starvation import StarvationConfig
from ltr_jax.sim.simulator import _ranker_time, simulate
from ltr_jax.sim.step_time import MeasuredStepTime
from ltr_jax.sim.trace import TraceEntry, make_arrivals

RANKER = "ltr_jax/data/ranker_smollm2_trace"
RANKER_PASS_S = 0.047


class Jittered:
    """``step`` with each prefill and decode step's time multiplied by exp(N(0, sigma)), from its own seed."""

    def __init__(self, step: MeasuredStepTime, sigma: float, seed: int) -> None:
        self.step, self.sigma, self.rng = step, sigma, np.random.default_rng(seed)

    def prefill_time(self, n_tokens: int) -> float:
        return self.step.prefill_time(n_tokens) * float(np.exp(self.rng.normal(0.0, self.sigma)))

    def decode_time(self, batch: int, tokens_in_cache: int) -> float:
        return self.step.decode_time(batch, tokens_in_cache) * float(np.exp(self.rng.normal(0.0, self.sigma)))


def seeds_of(spec: str) -> list[int]:
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def load_pool(path: Path) -> dict:
    if not path.is_file():
        from ltr_jax.bench.simulate import ranked_held_out_prompts

        pairs, scores, _, measured = ranked_held_out_prompts(RANKER, None, "reference")
        path.write_text(json.dumps({"pairs": pairs, "scores": scores, "measured": measured}))
    return json.loads(path.read_text())


def starvation_config(settings: list[str]) -> StarvationConfig:
    kinds = {f.name: f.type for f in fields(StarvationConfig)}
    values = {}
    for item in settings:
        key, _, raw = item.partition("=")
        kind = kinds[key]
        values[key] = (raw == "true" if kind == "bool" else int(raw) if kind == "int"
                       else float(raw) if kind == "float" else raw)
    return StarvationConfig(**values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-9", help="e.g. 0-59 or 0,1,5-9")
    p.add_argument("--load-factor", type=float, default=1.5)
    p.add_argument("--rate", type=float, default=None, help="req/s instead of --load-factor x capacity")
    p.add_argument("--decode-s", type=float, default=0.025, help="seconds per decode step")
    p.add_argument("--jitter", type=float, default=0.0, help="sigma of a lognormal factor on every step's time "
                   "(each policy's run draws its own)")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--pool", type=Path, default=Path("/tmp/starvation_proxy_pool.json"))
    p.add_argument("--set", action="append", default=[], help="a StarvationConfig key=value (repeatable)")
    args = p.parse_args()
    pool = load_pool(args.pool)
    config = starvation_config(args.set)
    step = MeasuredStepTime((args.decode_s, 0.0, 0.0), (0.015, 0.0007), 1e-4)
    ranker_cost = RANKER_PASS_S / step.prefill_time(80)  # the mean prompt: ~80 tokens
    rows = []
    for seed in seeds_of(args.seeds):
        order = np.random.default_rng(seed).permutation(len(pool["pairs"]))[: args.n]
        pairs = [(pool["pairs"][i][0], max(1, min(round(pool["pairs"][i][1] * 0.5), 512))) for i in order]
        scores = [pool["scores"][i] for i in order]
        burst = [TraceEntry(0.0, pl, ol, s, 0) for (pl, ol), s in zip(pairs[:64], scores[:64])]
        burst_rate = len(burst) / simulate(burst, Scheduler("fcfs", args.slots), step).sim_time_s
        capacity = burst_rate * float(np.mean([ol for _, ol in pairs[:64]])) / float(np.mean([ol for _, ol in pairs]))
        rate = args.rate or args.load_factor * capacity
        arrivals = make_arrivals("poisson", args.n, rate, seed=seed)
        trace = [TraceEntry(float(t), pl, ol, s, 0) for t, (pl, ol), s in zip(arrivals, pairs, scores)]
        out = {}
        for k, policy in enumerate(("fcfs", "ltr", "ltr+starvation")):
            name = "fcfs" if policy == "fcfs" else "ltr"
            sched = Scheduler(make_policy(name, **({"max_preemptions": 1} if name == "ltr" else {})), args.slots,
                              starvation=config if policy == "ltr+starvation" else None)
            ranker = partial(_ranker_time, ranker_cost, step) if name == "ltr" else None
            model = Jittered(step, args.jitter, 3 * seed + k) if args.jitter else step
            out[policy] = summarize(simulate(trace, sched, model, ranker_time=ranker, ranker_reuse=True).records)
        mean = {k: v["latency_s"]["mean"] for k, v in out.items()}
        worst = {k: v["max_waiting_time_s"]["max"] for k, v in out.items()}
        kept = (mean["fcfs"] - mean["ltr+starvation"]) / (mean["fcfs"] - mean["ltr"])
        promotions = out["ltr+starvation"]["promotions"] / args.n
        slack = config.slack_for(worst["fcfs"])
        past = worst["ltr+starvation"] - worst["fcfs"] - slack
        meets = kept >= 0.9 and past <= 0 and promotions < 0.2
        rows.append((kept, past, promotions, meets))
        print(f"seed {seed:3d} rate {rate:.3f}: mean fcfs {mean['fcfs']:6.2f} ltr {mean['ltr']:6.2f} rule "
              f"{mean['ltr+starvation']:6.2f} s, keeps {100 * kept:5.1f}%, worst wait {worst['ltr+starvation']:6.1f} "
              f"s vs {worst['fcfs'] + slack:6.1f} (ltr {worst['ltr']:6.1f}), {promotions:.3f} promotions "
              f"per request: {'meets' if meets else 'FAILS'}", flush=True)
    kept = [r[0] for r in rows]
    print(f"{sum(r[3] for r in rows)}/{len(rows)} seeds meet the three points; gain kept min {100 * min(kept):.1f}% "
          f"median {100 * float(np.median(kept)):.1f}%; worst wait past the bound on {sum(r[1] > 0 for r in rows)} "
          f"(most {max(r[1] for r in rows):+.1f} s); promotions per request at most {max(r[2] for r in rows):.3f}")


if __name__ == "__main__":
    main()
