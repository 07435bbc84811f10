"""Who waited, and why, in a real-engine starvation run: one `bench run` workload served by the real engine under
fcfs and under ltr+starvation (the default fcfs-slack rule), with the scheduler's view of every request kept.

For each request it records its arrival, score, length, TTFT, worst wait (and whether that was its TTFT or a gap
between tokens, and when it began), promotions and preemptions; for each promotion, the wait the request had, the
bound it crossed (`Scheduler.promotion_wait_s`), the FCFS-delay estimate then and how long its next token took; and
every second the bound and the estimate. Beside them, from the fcfs run of the same trace, the wait each request
really had under FCFS, so the estimate can be read against what it estimates.

    PYTHONPATH=. python scripts/starvation_real_trace.py --seed 1 --rate 2.066 --out trace_seed1.json

The workload flags are `bench run`'s (default: the trace ranker's held-out prompts, 300 requests, 4 slots, lengths
halved and capped at 512); ``--rate`` fixes the arrival rate, so a failing run's trace can be replayed.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from ltr_jax.bench import policy_bench as pb
from ltr_jax.bench.options import starvation_config, starvation_report
from ltr_jax.engine.engine import Engine
from ltr_jax.engine.ranking import make_ranking_stage, share_prefix
from ltr_jax.engine.sharding import mesh_for
from ltr_jax.models.llama import Llama
from ltr_jax.models.ranker_checkpoint import load_scorer
from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.scheduler import Scheduler
from ltr_jax.sim.trace import make_arrivals

WORKLOAD = ["--ranker", "ltr_jax/data/ranker_smollm2_trace", "--n", "300", "--slots", "4", "--length-scale", "0.5",
            "--max-output-tokens", "512", "--no-progress"]


class TracingScheduler(Scheduler):
    """A `Scheduler` that keeps what the trace reports (times relative to ``t0``, set at the first arrival)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.t0: float | None = None
        self.requests: list[dict] = []
        self.promotions: list[dict] = []
        self.bounds: list[tuple[float, float, float]] = []  # (t, bound, FCFS-delay estimate), one a second
        self._last_bound = float("nan")  # the latest promotion_wait_s
        self._pending: dict[str, dict] = {}  # request id -> its latest promotion's record, until its next token

    def add(self, req, now):
        if self.t0 is None:
            self.t0 = now
        super().add(req, now)

    def promotion_wait_s(self, now):
        bound = self._last_bound = super().promotion_wait_s(now)
        if not self.bounds or now - self.t0 - self.bounds[-1][0] >= 1.0:
            self.bounds.append((round(now - self.t0, 3), round(bound, 3), round(self.fcfs_delay_s(), 3)))
        return bound

    def _promote(self, req, now):
        rec = {"t": round(now - self.t0, 3), "id": req.request_id, "score": req.score, "n": req.promotions + 1,
               "waited_s": round(now - req.wait_clock_start, 3), "generated": req.generated,
               "bound_s": round(self._last_bound, 3),
               "fcfs_delay_s": round(self.fcfs_delay_s(), 3), "promoted_running": len(self._running_promoted),
               "runs_to_end": None, "token_after_s": None}
        super()._promote(req, now)
        rec["runs_to_end"] = req._runs_to_end
        self.promotions.append(rec)
        self._pending[req.request_id] = rec

    def on_token(self, req, now):
        rec = self._pending.pop(req.request_id, None)
        if rec is not None:
            rec["token_after_s"] = round(now - self.t0 - rec["t"], 3)
        super().on_token(req, now)

    def finish(self, req, now):
        super().finish(req, now)
        times = [req.arrival_time, *req.token_times]
        gaps = np.diff(times)
        k = int(np.argmax(gaps))
        self.requests.append({"id": req.request_id, "arrival_s": round(req.arrival_time - self.t0, 3),
                              "score": req.score, "length": req.generated, "ttft_s": round(req.ttft, 3),
                              "max_wait_s": round(float(gaps[k]), 3), "worst_is_ttft": k == 0,
                              "worst_began_s": round(times[k] - self.t0, 3), "promotions": req.promotions,
                              "preemptions": req.preemptions, "latency_s": round(req.latency, 3)})


def serve(engine, loaded, ranker, policy: str, items, arrivals, args) -> tuple[TracingScheduler, dict]:
    starvation = starvation_config(args, None) if policy == "ltr+starvation" else None
    name = "fcfs" if policy == "fcfs" else "ltr"
    params = {"max_preemptions": args.max_preemptions} if name == "ltr" else {}
    sched = TracingScheduler(make_policy(name, **params), engine.num_slots, starvation=starvation)
    ranking = None if name == "fcfs" else make_ranking_stage(
        engine, ranker, reuse_pass=args.reuse_ranker_pass, fuse_pass=args.fuse_ranker_pass,
        state_budget_mb=args.config_tree.ranker.state_budget_mb)
    kwargs = {"ranking": ranking, "max_queue": len(items) + 1, "preempt_mode": args.preempt_mode,
              "score_per_boundary": args.score_per_boundary,
              "swap_budget_mb": args.config_tree.engine.swap_budget_mb}
    obs, wall, stats, _ = pb.run_in_process(engine, loaded.tokenizer, sched, kwargs, policy, items, arrivals, args,
                                            policy)
    return sched, {"wall_s": wall, **pb.summarize_observed(obs, wall, stats, budgeted=False)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, required=True, help="arrival rate (req/s), e.g. the failing run's")
    p.add_argument("--out", required=True)
    opts, rest = p.parse_known_args()
    args = pb.parse_args([*WORKLOAD, "--seed", str(opts.seed), "--rates", str(opts.rate), *rest])
    tree = args.config_tree
    loaded = pb.load_serving_model(args.model, tree.model.dtype, tree.model.weight_dtype, tree.engine.num_slots)
    engine = Engine(Llama.from_params(loaded.config, loaded.params), tree.engine.to_engine_config(),
                    mesh=mesh_for(tree.engine.mesh, loaded.config))
    loaded = pb.share_engine_weights(loaded, engine)
    ranker_path, _ = pb.workload_rankers(args)
    items, _ = pb.build_items(loaded, args.prompts, args.lengths, args.n, args.max_prompt_tokens,
                              args.max_output_tokens, args.split, args.seed, args.length_scale,
                              held_out=pb.held_out_split(ranker_path))
    ranker = load_scorer(ranker_path, model=loaded, max_batch=max(pb.RANKER_BATCHES))
    share_prefix(loaded.tokenizer.shared_prefix if args.shared_prefix else None, engine, ranker, None)
    pb.warm_up(engine, items, [ranker], args.reuse_ranker_pass, args.fuse_max_len,
               swap=args.preempt_mode == "swap")
    arrivals = make_arrivals(args.arrival, len(items), opts.rate, args.cv, seed=args.seed)
    out = {"seed": opts.seed, "rate_req_s": opts.rate, "starvation": starvation_report(args), "runs": {}}
    fcfs_wait = {}
    for policy in ("fcfs", "ltr+starvation"):
        sched, summary = serve(engine, loaded, ranker, policy, items, arrivals, args)
        if policy == "fcfs":
            fcfs_wait = {r["id"]: r["max_wait_s"] for r in sched.requests}
        for r in sched.requests:
            r["fcfs_max_wait_s"] = fcfs_wait.get(r["id"])
        summary.pop("latencies_s", None)
        out["runs"][policy] = {"summary": summary, "requests": sorted(sched.requests, key=lambda r: r["arrival_s"]),
                               "promotions": sched.promotions, "bounds": sched.bounds}
        worst = max(sched.requests, key=lambda r: r["max_wait_s"])
        print(json.dumps({"policy": policy, "mean_latency_s": round(summary["latency_s"]["mean"], 3),
                          "worst": worst}), file=sys.stderr)
    with open(opts.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
