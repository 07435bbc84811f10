"""Replay a stream of AlpacaEval requests through the online learner alone (no engine, no clock): how good and how
steady its heads are, per window of requests, against the static offline ranker, over many seeds.

Each request's example is its prompt's cached backbone features (`train.features`, the ranker's 16 blocks) and
its Llama-3-8B answer length times ``--length-scale``; requests finish in arrival order; a round runs whenever
`OnlineLearner.due` says so, synchronously, and an accepted head scores the requests from then on. Per window of
``--window`` requests: the live heads' tau-b (score at arrival against length) and the static ranker's. It tells
what the learner's choices (swap rule, optimizer) do to the head a stream ends with, quickly and over many seeds;
`python -m ltr_jax.bench online` measures the same on the real engine, with latency.

With ``--simulate-load L`` it serves each seed's stream in the simulator instead (the real `Scheduler`, a 4-slot
CPU step model as `scripts/starvation_cpu_proxy.py`'s, Poisson arrivals at L x the stream's capacity) under fcfs,
the static ranker and a head learning online (untrained, or ``--start-ranker``'s; examples at each request's
finish, rounds at batch boundaries, every request still here rescored by an accepted head), and compares the
online arm's latency with the static ranker's per window of arrivals and over the final ``--window-s`` of them.

    PYTHONPATH=. python scripts/online_learner_replay.py --static-ranker DIR --seeds 0-19 [--set margin=0.02]
    PYTHONPATH=. python scripts/online_learner_replay.py --static-ranker DIR --seeds 0-19 --simulate-load 1.0
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from functools import partial

import numpy as np
from flax import nnx

from ltr_jax.engine import online
from ltr_jax.engine.settings import OnlineLearningConfig
from ltr_jax.models.ranker import RankerHead, head_scores
from ltr_jax.models.ranker_checkpoint import load_ranker
from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.scheduler import Scheduler
from ltr_jax.sim.simulator import _ranker_time, simulate
from ltr_jax.sim.step_time import MeasuredStepTime
from ltr_jax.sim.trace import TraceEntry, make_arrivals
from ltr_jax.train.data import DEFAULT_SPLIT_SALT, is_validation
from ltr_jax.train.features import cached_features
from ltr_jax.train.metrics import tau_b
from ltr_jax.train.trainer import TrainConfig, default_feature_cache_dir, load_serving_model, prepare_data

RANKER_PASS_S = 0.047  # the ranker's pass over a mean prompt in the step model of scripts/starvation_cpu_proxy.py


class LearningScheduler(Scheduler):
    """The ltr scheduler of an online arm: a request is scored by the live head when it arrives; a finished one
    becomes an example; at the boundary after a round's win the new head rescores every request still here (what
    the ranking stage does in the server)."""

    def __init__(self, slots, learner, head, score_fn, ids, features, lengths):
        super().__init__(make_policy("ltr"), slots)
        self.learner, self.score_fn = learner, score_fn
        self.ids, self.features, self.lengths = ids, features, lengths
        self.scores = score_fn(head, features)
        self.swaps: list[float] = []

    def add(self, req, now):
        req.score = float(self.scores[int(req.request_id.split("-")[1])])
        super().add(req, now)

    def finish(self, req, now):
        super().finish(req, now)
        i = int(req.request_id.split("-")[1])
        self.learner.observe(self.ids[i], self.features[i], req.score, int(self.lengths[i]), False)

    def boundary(self, _scheduler, now):
        self.learner.clock.t = now
        if not self.learner.due():
            return
        self.learner.run_round()
        got = self.learner.take_accepted()
        if got is None:
            return
        self.scores = self.score_fn(got[1], self.features)
        for req in [*self.waiting, *self.running]:
            req.score = float(self.scores[int(req.request_id.split("-")[1])])
        self.rerank()
        self.swaps.append(now)


def mean_latency(records, start: float, end: float) -> float:
    return float(np.mean([r.latency for r in records if start <= r.arrival_time < end]))


class StepClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def simulate_latency(args, config, spec, scores, data, x_all, lengths_all, rows, static_scores, stream_order) -> None:
    step = MeasuredStepTime((args.decode_s, 0.0, 0.0), (0.015, 0.0007), 1e-4)
    ranker = partial(_ranker_time, RANKER_PASS_S / step.prefill_time(80), step)  # reused by the prefill
    ratios = []
    for seed in parse_seeds(args.seeds):
        order = stream_order(seed)
        idx = [rows[i] for i in order]
        feats, lens = x_all[idx], lengths_all[idx]
        prompt = [len(data.tokens[i]) for i in idx]
        ids = [f"{k}-{data.ids[i]}" for k, i in enumerate(idx)]
        burst = [TraceEntry(0.0, pl, int(ol)) for pl, ol in zip(prompt[:64], lens[:64])]
        burst_rate = len(burst) / simulate(burst, Scheduler(make_policy("fcfs"), 4), step).sim_time_s
        capacity = burst_rate * float(np.mean(lens[:64])) / float(np.mean(lens))  # as `bench.workload_capacity`
        arrivals = make_arrivals("poisson", len(idx), args.simulate_load * capacity, seed=seed)
        out = {}
        for arm in ("fcfs", "static", "online"):
            arm_scores = static_scores[order] if arm == "static" else np.zeros(len(idx))
            trace = [TraceEntry(float(t), pl, int(ol), float(sc)) for t, pl, ol, sc in
                     zip(arrivals, prompt, lens, arm_scores)]
            hook = None
            if arm == "online":
                start = load_ranker(args.start_ranker)[0] if args.start_ranker else RankerHead.for_spec(spec, seed=seed)
                learner = online.OnlineLearner(config, spec, start, clock=StepClock(), seed=seed)
                sched = LearningScheduler(4, learner, start, scores, ids, feats, lens)
                hook = sched.boundary
            else:
                sched = Scheduler(make_policy("fcfs" if arm == "fcfs" else "ltr"), 4)
            out[arm] = simulate(trace, sched, step, on_boundary=hook, ranker_time=ranker if arm != "fcfs" else None,
                                ranker_reuse=True).records
        last = float(arrivals[-1])
        tail = (last - args.window_s, last + 1e-9)
        windows = [(w * args.window_s, (w + 1) * args.window_s) for w in range(int(last // args.window_s) + 1)]
        res = {"seed": seed, "capacity": round(capacity, 3),
               "mean": {a: round(mean_latency(r, 0, math.inf), 2) for a, r in out.items()},
               "last_window_online_vs_static": round(mean_latency(out["online"], *tail) /
                                                     mean_latency(out["static"], *tail), 3),
               "windows_online_vs_static": [round(mean_latency(out["online"], *w) / mean_latency(out["static"], *w),
                                                  2) for w in windows if any(w[0] <= t < w[1] for t in arrivals)],
               "swaps_s": [round(t) for t in sched.swaps]}
        ratios.append(res["last_window_online_vs_static"])
        print(json.dumps(res), flush=True)
    r = np.array(ratios)
    print(json.dumps({"load": args.simulate_load, "config": args.set, "last_window_online_vs_static": {
        "mean": round(float(r.mean()), 3), "median": round(float(np.median(r)), 3), "min": round(float(r.min()), 3),
        "max": round(float(r.max()), 3), "within_10pct": int(np.sum(r <= 1.1)), "seeds": len(r)}}))


def parse_seeds(text: str) -> list[int]:
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/ranker_alpacaeval_llama3_8b.yaml")
    p.add_argument("--static-ranker", required=True, help="the offline ranker (its val split makes the stream)")
    p.add_argument("--seeds", default="0-9")
    p.add_argument("--start-ranker", default=None, help="start the learner from this export's head (e.g. a ranker "
                   "trained on other traffic) instead of an untrained one")
    p.add_argument("--stream", choices=("held-out", "all"), default="held-out", help="held-out: the prompts the "
                   "static ranker's training held out; all: its training prompts first, then those")
    p.add_argument("--length-scale", type=float, default=0.15)
    p.add_argument("--rate", type=float, default=1.8, help="requests per clock second (for interval_s)")
    p.add_argument("--window", type=int, default=86, help="requests per reported window")
    p.add_argument("--weight-decay", type=float, default=None, help="replace the learner's AdamW weight decay")
    p.add_argument("--learning-rate", type=float, default=None, help="replace the learner's learning rate")
    p.add_argument("--simulate-load", type=float, default=None, help="instead: serve each seed's stream in the "
                   "simulator at this multiple of its capacity (4-slot CPU step model) under fcfs, the static ranker "
                   "and a head learning online from untrained, and compare their latency per window of arrivals")
    p.add_argument("--window-s", type=float, default=60.0, help="with --simulate-load: seconds per window")
    p.add_argument("--decode-s", type=float, default=0.022, help="with --simulate-load: seconds per decode step")
    p.add_argument("--set", action="append", default=[], help="ranker.online key=value")
    args = p.parse_args()

    if args.weight_decay is not None:
        online.WEIGHT_DECAY = args.weight_decay
    if args.learning_rate is not None:
        online.LEARNING_RATE = args.learning_rate
    cfg = TrainConfig.from_yaml(args.config, [])
    loaded = load_serving_model(cfg.model)
    data, _, _ = prepare_data(cfg, loaded.tokenizer)
    feats = cached_features(loaded.config, loaded.params, data.tokens, cfg.n_layers, default_feature_cache_dir(),
                            progress=False)
    static, spec, meta = load_ranker(args.static_ranker)
    trained = (meta or {}).get("train_config") or {}
    fraction = float(trained.get("val_fraction", 0.5))
    salt = str(trained.get("split_salt", DEFAULT_SPLIT_SALT))
    x_all = np.concatenate([feats.mean, feats.last], axis=1) if spec.pooling == "mean+last" else \
        (feats.mean if spec.pooling == "mean" else feats.last)
    held = [i for i, rid in enumerate(data.ids) if is_validation(rid, fraction, salt)]
    trained = [i for i, rid in enumerate(data.ids) if not is_validation(rid, fraction, salt)]
    rows = held if args.stream == "held-out" else trained + held  # as `bench online --stream`: held-out last
    lengths_all = np.maximum(1, np.round(data.lengths * args.length_scale)).astype(int)

    overrides = {}
    for kv in args.set:
        k, v = kv.split("=", 1)
        default = getattr(OnlineLearningConfig(), k)
        overrides[k] = (v.lower() in ("1", "true", "yes") if isinstance(default, bool) else
                        type(default)(v) if default is not None else v)
    config = dataclasses.replace(OnlineLearningConfig(enabled=True, cpu_share=1.0, max_train_s=1e9), **overrides)

    def scores(head, x):
        return head_scores(spec.method, *nnx.split(head), x)

    static_scores = scores(static, x_all[rows])
    offline = tau_b(static_scores[len(rows) - len(held):], lengths_all[held])

    def stream_order(seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        first = len(rows) - len(held)
        return np.concatenate([rng.permutation(first), first + rng.permutation(len(held))]).astype(int)

    if args.simulate_load is not None:
        simulate_latency(args, config, spec, scores, data, x_all, lengths_all, rows, static_scores, stream_order)
        return
    out = []
    for seed in parse_seeds(args.seeds):
        order = stream_order(seed)
        idx = [rows[i] for i in order]
        clock = StepClock()
        start = load_ranker(args.start_ranker)[0] if args.start_ranker else RankerHead.for_spec(spec, seed=seed)
        learner = online.OnlineLearner(config, spec, start, clock=clock, seed=seed)
        live = start
        live_scores, versions = [], []
        for n, i in enumerate(idx):
            clock.t = n / args.rate
            s = float(scores(live, x_all[i:i + 1])[0])
            live_scores.append(s)
            versions.append(learner.version)
            learner.observe(data.ids[i], x_all[i], s, int(lengths_all[i]), False)
            if learner.due():
                learner.run_round()
                got = learner.take_accepted()
                if got is not None:
                    live = got[1]
        lens = lengths_all[idx]
        st = static_scores[order]
        windows = []
        for w in range(0, len(idx), args.window):
            sl = slice(w, w + args.window)
            windows.append({"online": round(tau_b(np.array(live_scores[sl]), lens[sl]), 3),
                            "static": round(tau_b(st[sl], lens[sl]), 3), "version": versions[sl][-1]})
        half = slice(len(idx) // 2, None)  # scored at arrival, before any head trained on them
        res = {"seed": seed, "windows": windows, "accepted": learner.metrics["accepted"],
               "rejected": learner.metrics["rejected"],
               "second_half": {"online": round(tau_b(np.array(live_scores[half]), lens[half]), 3),
                               "static": round(tau_b(st[half], lens[half]), 3)}}
        out.append(res)
        print(json.dumps(res), flush=True)
    last = np.array([r["windows"][-1]["online"] - r["windows"][-1]["static"] for r in out])
    half = np.array([r["second_half"]["online"] - r["second_half"]["static"] for r in out])
    print(json.dumps({"offline_tau": round(float(offline), 3), "config": overrides, "weight_decay": online.WEIGHT_DECAY,
                      "learning_rate": online.LEARNING_RATE,
                      "last_window_online_minus_static": {"mean": round(float(last.mean()), 3),
                                                          "min": round(float(last.min()), 3),
                                                          "max": round(float(last.max()), 3)},
                      "second_half_online_minus_static": {"mean": round(float(half.mean()), 3),
                                                          "min": round(float(half.min()), 3),
                                                          "max": round(float(half.max()), 3)},
                      "accepted_mean": float(np.mean([r["accepted"] for r in out]))}))


if __name__ == "__main__":
    main()
