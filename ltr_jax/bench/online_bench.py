"""`python -m ltr_jax.bench online`: the ranker learning from live traffic, on a replayed stream through the real
engine.

Owns the online-learning benchmark. One stream of chat traffic (by default every AlpacaEval prompt of the shared
file, in a seeded order, Poisson arrivals at ``--load`` times this machine's measured capacity, each request
replaying its recorded Llama-3-8B answer length times ``--length-scale`` with ignore_eos) is served by the real
orchestrator once per arm:

* ``fcfs``: arrival order, no ranker;
* ``static``: the offline-trained ranker (the packaged AlpacaEval / Llama-3-8B one), never retrained;
* ``online-untrained``: the same backbone features with a freshly initialised head, learning online
  (``ranker.online``);
* ``online-mismatched``: the ranker trained on a different distribution (the shared prompt mix's trace ranker),
  learning online.

Per window of arrivals (``--window-s``) it reports, for each arm, live tau-b (the score each request had when it
finished, against its length; a bootstrap 95% CI), mean latency and the head version; the offline reference
(`offline_tau`) is the static ranker's tau-b on the stream's prompts its training held out, which by default
come last in the stream, so the last windows compare every head on prompts none was trained on. It also reports what
training cost: its compute seconds over the loop's busy seconds, and the decode step-time distribution of steps
run while a round was training against those that were not. The summary's last window is the final
``--window-s`` seconds of arrivals, so it is a full window whatever the calendar windows' last one holds; beside
its live tau-b it gives the tau-b the arm's starting head gives the same requests (scored from their stored
features), and the difference with a paired CI.
``--out`` writes report.json, report.md and online.png; ``--json`` prints a summary object as the last line of
stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from ltr_jax.bench.options import add_config_options
from ltr_jax.bench.policy_bench import (
    RANKER_BATCHES,
    build_items,
    held_out_split,
    load_serving_model,
    run_in_process,
    share_engine_weights,
    warm_up,
)
from ltr_jax.bench.report import write_summary
from ltr_jax.bench.workload import workload_capacity
from ltr_jax.config import ConfigError, EngineRunConfig, load_config
from ltr_jax.engine.engine import Engine
from ltr_jax.engine.online import OnlineLearner
from ltr_jax.engine.ranking import make_ranking_stage, warmup_ranker
from ltr_jax.engine.sharding import mesh_for
from ltr_jax.machine import machine_info
from ltr_jax.models.llama import Llama
from ltr_jax.models.ranker import RankerHead, head_scores
from ltr_jax.models.ranker_checkpoint import default_ranker_path, load_scorer
from ltr_jax.scheduler.metrics import distribution
from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.scheduler import Scheduler
from ltr_jax.sim.trace import make_arrivals
from ltr_jax.train.data import DEFAULT_SPLIT_SALT, is_validation, shared_dir
from ltr_jax.train.metrics import bootstrap_ci, paired_tau_difference_ci, tau_b, tau_difference_ci

ARMS = ("fcfs", "static", "online-untrained", "online-mismatched")
ONLINE_ARMS = ("online-untrained", "online-mismatched")
MIN_WINDOW_REQUESTS = 10  # a window with fewer finished requests reports no tau


class RecordingLearner(OnlineLearner):
    """An `OnlineLearner` that also logs every finished request the ranking stage reports to it (request id, the
    score it had when it finished, its length, whether exact, the head version serving then). ``learn=False``:
    it only logs (the static arm: the same ranking stage, never retrained). It keeps each request's ranker
    features too, so the benchmark can score the same requests with the head it started from."""

    def __init__(self, *args, learn: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.learn = learn
        self.stage = None  # the ranking stage it serves, set once built (for the version live now)
        self.log: dict[str, tuple[float, int, bool, int]] = {}
        self.features: dict[str, np.ndarray] = {}
        self.live_since: dict[int, float] = {0: time.monotonic()}  # head version -> when it went live

    def take_accepted(self):
        accepted = super().take_accepted()
        if accepted is not None:
            self.live_since[accepted[0]] = time.monotonic()
        return accepted

    def observe(self, request_id, features, score, length, censored) -> None:
        version = self.stage.version if self.stage is not None else self.version
        self.log[request_id] = (float(score), int(length), not censored, version)
        self.features[request_id] = np.asarray(features, np.float32)
        if self.learn:
            super().observe(request_id, features, score, length, censored)

    def due(self) -> bool:
        return self.learn and super().due()


class StepRecorder:
    """Orchestrator observer: each decode step's seconds and batch size, and whether a training round was
    running meanwhile."""

    def __init__(self, learner: OnlineLearner | None):
        self.learner = learner
        self.steps: list[tuple[float, int, bool]] = []

    def on_step(self, batch_size: int, seconds: float, n_tokens: int) -> None:
        self.steps.append((seconds, batch_size, bool(self.learner is not None and self.learner.training)))

    def on_first_token(self, request_id, ttft_s) -> None: ...
    def on_token_gap(self, seconds) -> None: ...
    def on_finish(self, request_id, reason, n_tokens, latency_s) -> None: ...
    def on_preempt(self, n) -> None: ...
    def on_promote(self, n) -> None: ...
    def on_ranker(self, seconds, n) -> None: ...


# ------------------------------------------------------------------------------------------------ one arm
def arm_scorer(arm: str, path: str, loaded, seed: int):
    """The ranker an arm starts from: the export at ``path``, with a freshly initialised head for the untrained arm."""
    scorer = load_scorer(path, model=loaded, max_batch=max(RANKER_BATCHES))
    if arm == "online-untrained":
        scorer.swap_head(RankerHead.for_spec(scorer.spec, seed=seed))
    return scorer


def serve_arm(arm: str, engine: Engine, loaded, items, arrivals, args, scorer, held_out: set[str]) -> dict[str, Any]:
    """Replay the stream under one arm (``scorer``: its ranker, None for fcfs); returns its per-request records,
    counters and step times."""
    learner = None
    ranking = None
    start_head = None
    if arm != "fcfs":
        start_head = nnx.split(nnx.clone(scorer.head))
        online_cfg = dataclasses.replace(args.config_tree.ranker.online, enabled=True, dir=None)
        learner = RecordingLearner(online_cfg, scorer.spec, scorer.head, seed=args.seed,
                                   learn=arm in ONLINE_ARMS)
        ranking = make_ranking_stage(engine, scorer, reuse_pass=args.config_tree.ranker.reuse_pass,
                                     state_budget_mb=args.config_tree.ranker.state_budget_mb, online=learner)
        learner.stage = ranking
    sched = Scheduler(make_policy("fcfs" if arm == "fcfs" else "ltr"), engine.num_slots)
    recorder = StepRecorder(learner)
    kwargs = {"ranking": ranking, "max_queue": len(items) + 1, "observer": recorder,
              "preempt_mode": args.config_tree.engine.preempt_mode,
              "score_per_boundary": args.config_tree.ranker.score_per_boundary,
              "swap_budget_mb": args.config_tree.engine.swap_budget_mb}
    if learner is not None:
        learner.start()
    try:
        observed, wall, stats, _ = run_in_process(engine, loaded.tokenizer, sched, kwargs, arm, items, arrivals,
                                                  args, arm)
    finally:
        if learner is not None:
            learner.stop()
    t0 = min(o.submit for o in observed)
    live_since = {v: max(0.0, t - t0) for v, t in learner.live_since.items()} if learner is not None else {0: 0.0}
    start_scores = {}
    if learner is not None and learner.features:  # the head the arm started from, on the same requests
        rids = list(learner.features)
        start_scores = dict(zip(rids, head_scores(scorer.spec.method, *start_head,
                                                  np.stack([learner.features[r] for r in rids])).tolist()))
    records = []
    for i, (item, ob) in enumerate(zip(items, observed)):
        rid = f"{i}-{item.id}"
        score, length, exact, version = learner.log.get(rid, (math.nan, ob.n_tokens, True, 0)) if learner \
            else (math.nan, ob.n_tokens, True, 0)
        records.append({"arrival_s": ob.submit - t0, "finish_s": (ob.finish or math.nan) - t0,
                        "latency_s": (ob.finish or math.nan) - ob.submit, "length": length, "score": score,
                        "start_score": start_scores.get(rid, math.nan),
                        "exact": exact, "version": version, "complete": ob.reason == "length"
                        and ob.n_tokens == item.output_len, "held_out": item.id in held_out})
    train_s = learner.metrics["train_seconds"] if learner is not None else 0.0
    return {"records": records, "live_since_s": live_since, "wall_s": wall, "busy_s": stats["busy_seconds"],
            "train_seconds": train_s,
            "online": learner.stats() if learner is not None and learner.learn else None,
            "rounds": list(learner.round_log) if learner is not None and learner.learn else None,
            "train_steps": learner.metrics["train_steps"] if learner is not None else 0,
            "steps": recorder.steps, "preemptions": stats["preemptions"]}


# ------------------------------------------------------------------------------------------------ report
def _scored(record: dict) -> bool:
    """A finished request whose true length and score are known (a report's records hold None for nan)."""
    return record["complete"] and record["exact"] and record["score"] is not None and math.isfinite(record["score"])


def _rounded(x: float) -> float | None:
    """A tau for a report: 4 decimals, None for nan."""
    return round(x, 4) if math.isfinite(x) else None


def tau_with_ci(records: list[dict], seed: int = 0) -> dict[str, Any]:
    rows = [r for r in records if _scored(r)]
    if len(rows) < MIN_WINDOW_REQUESTS:
        return {"tau_b": None, "ci95": None, "n": len(rows)}
    scores = np.array([r["score"] for r in rows])
    lengths = np.array([r["length"] for r in rows])
    tau = tau_b(scores, lengths)
    ci = bootstrap_ci(scores, lengths, n_resamples=500, seed=seed)
    return {"tau_b": _rounded(tau), "ci95": [_rounded(ci[0]), _rounded(ci[1])], "n": len(rows)}


def latency_ratio_with_ci(records: list[dict], reference: list[dict], start_s: float, end_s: float,
                          seed: int = 0) -> dict[str, Any]:
    """Mean latency of the requests arriving in [start_s, end_s) in one arm over the same requests' in
    ``reference`` (the same trace: requests are paired by arrival time), with a paired bootstrap 95% CI over
    those requests. A window of a few dozen requests decides little, and the CI says how little."""
    from scipy import stats

    ref = {round(r["arrival_s"], 6): r["latency_s"] for r in reference if r["complete"]}
    pairs = [(r["latency_s"], ref[key]) for r in records
             if r["complete"] and start_s <= r["arrival_s"] < end_s and (key := round(r["arrival_s"], 6)) in ref]
    if len(pairs) < 2:
        return {"ratio": None, "ci95": None, "n": len(pairs)}
    ours, theirs = (np.array(x) for x in zip(*pairs))
    ratio = float(ours.mean() / theirs.mean())
    if np.allclose(ours, ratio * theirs):  # every pair has the same ratio: nothing to resample
        return {"ratio": round(ratio, 3), "ci95": [round(ratio, 3)] * 2, "n": len(pairs)}
    ci = stats.bootstrap((ours, theirs), lambda a, b, axis: a.mean(axis) / b.mean(axis), paired=True,
                         vectorized=True, n_resamples=2000, method="percentile",
                         random_state=np.random.default_rng(seed)).confidence_interval
    return {"ratio": round(ratio, 3), "ci95": [round(float(ci.low), 3), round(float(ci.high), 3)], "n": len(pairs)}


def windows_of(arm_result: dict[str, Any], window_s: float) -> list[dict[str, Any]]:
    """Per window of arrivals (the same requests in every arm): live tau-b with CI, mean latency, the head version
    most of its requests finished under, and ``reached_s``: when that head was live and the window had arrived
    (the time a dashboard could have shown this window's tau with the head that earned it)."""
    records = [r for r in arm_result["records"] if r["complete"]]
    last = max(r["arrival_s"] for r in records)
    live_since = arm_result["live_since_s"]
    out = []
    for w in range(int(last // window_s) + 1):
        inside = [r for r in records if w * window_s <= r["arrival_s"] < (w + 1) * window_s]
        if not inside:
            continue
        versions = [r["version"] for r in inside]
        version = max(set(versions), key=versions.count)
        out.append({"window": w, "start_s": w * window_s, "end_s": (w + 1) * window_s, "requests": len(inside),
                    "mean_latency_s": round(float(np.mean([r["latency_s"] for r in inside])), 3),
                    "head_version": version,
                    "reached_s": round(max((w + 1) * window_s, live_since.get(version, 0.0)), 1),
                    "last_finish_s": round(max(r["finish_s"] for r in inside), 1), **tau_with_ci(inside, seed=w)})
    return out


def step_times(steps: list[tuple[float, int, bool]], slots: int) -> dict[str, Any]:
    """Decode step seconds: every step and the full-batch ones, apart by whether a round was training."""
    def dist(sel):
        values = [s for s, _, _ in sel]
        return {"steps": len(values), **{k: round(v * 1e3, 3) for k, v in distribution(values).items()}} \
            if values else None

    full = [s for s in steps if s[1] == slots]
    return {"unit": "ms", "slots": slots,
            "all_steps": {"training": dist([s for s in steps if s[2]]), "not_training": dist([s for s in steps
                                                                                                if not s[2]])},
            "full_batch_steps": {"training": dist([s for s in full if s[2]]),
                                 "not_training": dist([s for s in full if not s[2]])}}


def minutes_to_fraction(windows: list[dict], target: float | None) -> float | None:
    """Minutes of served traffic until the first window whose live tau-b reaches ``target`` (its ``reached_s``);
    None when no window does."""
    if target is None:
        return None
    for w in windows:
        if w["tau_b"] is not None and w["tau_b"] >= target:
            return round(w["reached_s"] / 60, 2)
    return None


def plot(report: dict[str, Any], out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tau, ax_lat) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for arm, res in report["arms"].items():
        ws = res["windows"]
        mids = [(w["start_s"] + w["end_s"]) / 120 for w in ws]
        color = f"C{ARMS.index(arm)}"  # one colour per arm in both panels
        if arm != "fcfs":
            ax_tau.plot(mids, [w["tau_b"] if w["tau_b"] is not None else np.nan for w in ws], marker="o", label=arm,
                        color=color)
        ax_lat.plot(mids, [w["mean_latency_s"] for w in ws], marker="o", label=arm, color=color)
    if report["offline_tau"]["tau_b"] is not None:
        ax_tau.axhline(report["offline_tau"]["tau_b"], color="grey", ls="--", label="offline ranker (held out)")
        ax_tau.axhline(0.9 * report["offline_tau"]["tau_b"], color="grey", ls=":", label="90% of offline")
    ax_tau.set(ylabel="live tau-b (finished requests)", title="online ranker learning: tau-b and latency by "
               "arrival window")
    ax_lat.set(xlabel="arrival time (minutes)", ylabel="mean latency (s)")
    for ax in (ax_tau, ax_lat):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "online.png", dpi=120)
    plt.close(fig)
    return "online.png"


def markdown(report: dict[str, Any]) -> str:
    load = (f"{report['load']:g} x capacity {report['capacity_req_s']:.3f} req/s" if report["capacity_req_s"]
            else "rate given")
    offline = report["offline_tau"]
    lines = [(f"{report['length_source']}; {report['n']} requests, Poisson at {report['rate_req_s']:.3f} req/s "
              f"({load}), {report['slots']} slots\n"),
             (f"offline ranker's tau-b on the held-out prompts of this stream: {offline['tau_b']} "
              f"{offline['ci95']} (n={offline['n']})\n"),
             ("| arm | window | arrivals (s) | requests | live tau-b [95% CI] | mean latency (s) | head version | "
              "reached (min) |"), "|---|---|---|---|---|---|---|---|"]
    for arm, res in report["arms"].items():
        for w in res["windows"]:
            tau = "-" if w["tau_b"] is None else f"{w['tau_b']:.3f} {w['ci95']}"
            lines.append(f"| {arm} | {w['window']} | {w['start_s']:.0f}-{w['end_s']:.0f} | {w['requests']} | {tau} "
                         f"| {w['mean_latency_s']:.2f} | {w['head_version']} | {w['reached_s'] / 60:.2f} |")
    lines.append("\n(head version: the one most of the window's requests finished under; reached: minute it was live "
                 "and the window had arrived)")
    lines.append("\n| arm | mean latency (s) | train share of busy | rounds | accepted | rejected |")
    lines.append("|---|---|---|---|---|---|")
    for arm, res in report["arms"].items():
        o = res["online"] or {}
        lines.append(f"| {arm} | {res['mean_latency_s']:.2f} | {res['train_share_of_busy']:.4f} | "
                     f"{o.get('online_rounds', '-')} | {o.get('online_accepted', '-')} | "
                     f"{o.get('online_rejected', '-')} |")
    lines.append("\n| arm | last window: live tau-b | the starting head's on the same requests | gain [95% CI] |")
    lines.append("|---|---|---|---|")
    for arm, res in report.get("summary", {}).get("arms", {}).items():
        gain = res["tau_gain_over_start_last_window"] or {}
        lines.append(f"| {arm} | {res['tau_last_window']} | {gain.get('start_head_tau_b')} | {gain.get('tau_b')} "
                     f"{gain.get('ci95')} |")
    lines.append("\nstep times (ms): " + json.dumps({a: r["step_times_ms"]["full_batch_steps"]
                                                     for a, r in report["arms"].items()}))
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.bench online", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_config_options(p)
    p.add_argument("--prompts", default=None, help="prompt file (default: the shared AlpacaEval file, "
                   "<shared>/data/alpacaeval_llama3.jsonl)")
    p.add_argument("--lengths", default="outputs.llama3-8b", help="each request's replayed output length: "
                   "'reference', 'outputs.NAME' or a label file of the serving model's own lengths")
    p.add_argument("--ranker", default=None, help="the offline-trained ranker of this traffic (static arm; its "
                   "backbone and shape also make the untrained arm's head; default: the packaged AlpacaEval / "
                   "Llama-3-8B ranker)")
    p.add_argument("--mismatched-ranker", default=None, help="a ranker trained on other traffic (default: the "
                   "packaged trace ranker of the shared prompt mix)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    p.add_argument("--n", type=int, default=400, help="requests in the stream, each prompt at most once (0: every "
                   "prompt of the file)")
    p.add_argument("--length-scale", type=float, default=0.15, help="multiply every replayed length (keeps their "
                   "order and shape; makes a CPU run of the whole stream take minutes)")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="prompts longer than this are left out")
    p.add_argument("--load", type=float, default=1.0, help="request rate as a multiple of the workload's capacity "
                   "measured on this machine (a burst of --capacity-probe requests under fcfs). At 1 the queue drains "
                   "between bursts, so a late window measures the head serving it; above 1 a finite stream's backlog "
                   "grows to its end, and a late window still carries the first minutes' misordering")
    p.add_argument("--rate", type=float, default=None, help="request rate in req/s (replaces --load)")
    p.add_argument("--capacity-probe", type=int, default=64, help="requests of the capacity burst")
    p.add_argument("--stream", choices=("all", "held-out"), default="all",
                   help="held-out: only the prompts the offline ranker's training held out, so the static arm never "
                   "saw any prompt of the stream (train that ranker with a large val_fraction); all: every prompt")
    p.add_argument("--held-out-last", action=argparse.BooleanOptionalAction, default=True,
                   help="order the stream so the prompts the offline ranker's training held out come last (each "
                   "part in seeded order): the last windows compare the static and online heads on prompts "
                   "neither was trained on; off: one seeded order")
    p.add_argument("--window-s", type=float, default=60.0, help="seconds of arrivals per reported window")
    p.add_argument("--slots", type=int, default=None, help="decode slots (engine.num_slots)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stream's order, arrivals and the untrained "
                   "head")
    p.add_argument("--out", default=None, help="directory for report.json, report.md and online.png")
    p.add_argument("--json", action="store_true", help="print the summary object as the last line of stdout")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    args = p.parse_args(argv)
    arms = args.arms.split(",")
    bad = [a for a in arms if a not in ARMS]
    if bad or not arms:
        p.error(f"--arms: unknown {bad}; choose from {', '.join(ARMS)}")
    args.arms = arms
    if not args.length_scale > 0:
        p.error(f"--length-scale must be > 0, got {args.length_scale}")
    if not args.window_s > 0:
        p.error(f"--window-s must be > 0 seconds, got {args.window_s}")
    if args.rate is not None and not args.rate > 0:
        p.error(f"--rate must be > 0 req/s, got {args.rate}")
    if not args.load > 0:
        p.error(f"--load must be > 0, got {args.load}")
    overrides = list(args.overrides) + ([f"engine.num_slots={args.slots}"] if args.slots is not None else [])
    try:
        args.config_tree = load_config(args.config, overrides, EngineRunConfig)
    except ConfigError as err:
        p.error(str(err))
    args.slots = args.config_tree.engine.num_slots
    args.temperature = 0.0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    packaged = default_ranker_path().parent
    offline_path = args.ranker or str(packaged / "ranker_alpacaeval_llama3_8b")
    mismatched_path = args.mismatched_ranker or str(packaged / "ranker_smollm2_trace")
    prompts = args.prompts or str(shared_dir() / "data" / "alpacaeval_llama3.jsonl")
    tree = args.config_tree
    loaded = load_serving_model(tree.model.source, tree.model.dtype, tree.model.weight_dtype, tree.engine.num_slots)
    model = Llama.from_params(loaded.config, loaded.params)
    engine = Engine(model, tree.engine.to_engine_config(), mesh=mesh_for(tree.engine.mesh, loaded.config))
    loaded = share_engine_weights(loaded, engine)
    items, length_source = build_items(loaded, prompts, args.lengths, args.n or 10**9, args.max_prompt_tokens,
                                       10**6, "all", args.seed, args.length_scale, refill=False)
    fraction, salt = held_out_split(offline_path) or (0.1, DEFAULT_SPLIT_SALT)
    held_out = {i.id for i in items if is_validation(i.id, fraction, salt)}  # prompts the offline ranker never saw
    if args.stream == "held-out":
        items = [i for i in items if i.id in held_out]
        if not items:
            raise SystemExit(f"--stream held-out: the offline ranker {offline_path} held out none of these prompts")
    if args.held_out_last:  # the last windows then compare every arm on prompts no head was trained on
        items = [i for i in items if i.id not in held_out] + [i for i in items if i.id in held_out]
    length_source += f", each scaled by {args.length_scale:g}"
    paths = {"static": offline_path, "online-untrained": offline_path, "online-mismatched": mismatched_path}
    scorers = {a: arm_scorer(a, paths[a], loaded, args.seed) for a in args.arms if a != "fcfs"}
    print(f"warming up the engine ({len(items)} prompts, {args.slots} slots) ...", file=sys.stderr)
    warm_s = warm_up(engine, items, list(scorers.values())[:1], args.config_tree.ranker.reuse_pass, 0,
                     swap=args.config_tree.engine.preempt_mode == "swap")
    prompt_tokens = [i.prompt_tokens for i in items]
    for scorer in list(scorers.values())[1:]:  # a head built here (not restored) compiles its own passes once
        warmup_ranker(engine, scorer, scorer.pass_lengths(prompt_tokens), batch_sizes=RANKER_BATCHES,
                      reuse_ranker_pass=args.config_tree.ranker.reuse_pass)
    capacity = None
    rate = args.rate
    if rate is None:
        probe = items[: args.capacity_probe]
        sched = Scheduler(make_policy("fcfs"), engine.num_slots)
        obs, wall, _, _ = run_in_process(engine, loaded.tokenizer, sched, {"max_queue": len(probe) + 1}, "fcfs",
                                         probe, np.zeros(len(probe)), args, "capacity")
        capacity = workload_capacity(probe, items, sum(o.reason == "length" for o in obs) / wall)
        rate = args.load * capacity
        print(f"capacity {capacity:.3f} req/s: rate {rate:.3f} req/s", file=sys.stderr)
    arrivals = make_arrivals("poisson", len(items), rate, 1.0, seed=args.seed)
    report: dict[str, Any] = {
        "benchmark": "online learning of the ranker on the real engine", "model": loaded.config.name,
        "command": "python -m ltr_jax.bench online " + " ".join(sys.argv[2:] if argv is None else argv),
        "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "length_source": length_source, "stream": args.stream, "n": len(items), "slots": args.slots, "seed": args.seed,
        "rate_req_s": rate, "load": args.load if args.rate is None else None,
        "capacity_req_s": capacity, "warmup_s": round(warm_s, 1), "window_s": args.window_s,
        "offline_ranker": offline_path, "mismatched_ranker": mismatched_path,
        "online_config": dataclasses.asdict(args.config_tree.ranker.online), "arms": {},
    }
    for arm in args.arms:
        res = serve_arm(arm, engine, loaded, items, arrivals, args, scorers.get(arm), held_out)
        done = [r for r in res["records"] if r["complete"]]
        summary = {"mean_latency_s": float(np.mean([r["latency_s"] for r in done])), "completed": len(done),
                   "wall_s": round(res["wall_s"], 1), "busy_s": round(res["busy_s"], 4),
                   "train_seconds": round(res["train_seconds"], 4), "train_steps": res["train_steps"],
                   "train_share_of_busy": res["train_seconds"] / max(res["busy_s"], 1e-9),
                   "online": res["online"], "rounds": res["rounds"], "preemptions": res["preemptions"],
                   "windows": windows_of(res, args.window_s),
                   "step_times_ms": step_times(res["steps"], engine.num_slots),
                   "tau_all": tau_with_ci(done) if arm != "fcfs" else None,
                   "head_live_since_s": {str(v): round(t, 1) for v, t in res["live_since_s"].items()},
                   "records": [{k: ((round(v, 4) if math.isfinite(v) else None) if isinstance(v, float) else v)
                                for k, v in r.items()} for r in res["records"]]}
        if arm == "static":
            report["offline_tau"] = tau_with_ci([r for r in done if r["held_out"]])
        report["arms"][arm] = summary
        print(json.dumps({"arm": arm, "mean_latency_s": round(summary["mean_latency_s"], 3),
                          "tau_all": summary["tau_all"], "train_share_of_busy":
                          round(summary["train_share_of_busy"], 4)}), file=sys.stderr)
    report.setdefault("offline_tau", {"tau_b": None, "ci95": None, "n": 0})
    report["summary"] = summarize(report)
    if args.out:
        write_summary(report, markdown(report), args.out)
        plot(report, Path(args.out))
    print(markdown(report))
    if args.json:
        print(json.dumps(report["summary"]))
    return report


def last_window(records: list[dict], window_s: float) -> tuple[float, float]:
    """[start, end) of the final ``window_s`` seconds of arrivals: a full window, however few requests the last
    calendar window (``windows_of``) happens to hold."""
    last = max(r["arrival_s"] for r in records if r["complete"])
    return last - window_s, math.nextafter(last, math.inf)


def paired_gain(records: list[dict]) -> dict[str, Any] | None:
    """On the given requests, tau-b of the scores they were served with minus tau-b of the scores the arm's
    starting head gives the same requests (from their stored features), with a paired bootstrap 95% CI: what
    learning changed, without the noise of comparing two different sets of requests."""
    rows = [r for r in records if _scored(r) and r.get("start_score") is not None
            and math.isfinite(r["start_score"])]
    if len(rows) < MIN_WINDOW_REQUESTS:
        return None
    diff, lo, hi = paired_tau_difference_ci(*(np.array([r[k] for r in rows]) for k in ("start_score", "score",
                                                                                       "length")))
    return {"tau_b": _rounded(diff), "ci95": [_rounded(lo), _rounded(hi)], "n": len(rows),
            "start_head_tau_b": _rounded(tau_b(np.array([r["start_score"] for r in rows]),
                                               np.array([r["length"] for r in rows])))}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The headline numbers: for each online arm its first window's and its last window's (`last_window`) live
    tau-b with CIs, their difference (independent resamples), the last window's gain over the arm's starting head
    on the same requests (`paired_gain`), minutes of served traffic until a window reached 90% of the offline tau,
    the last window's mean latency against the static ranker's on the same requests (paired bootstrap CI), and
    training's share of busy time. The top-level keys are the untrained arm's (else the first)."""
    offline = report["offline_tau"]["tau_b"]
    target = 0.9 * offline if offline is not None else None
    arms = report["arms"]
    per_arm = {}
    for arm in (a for a in ONLINE_ARMS if a in arms):
        ws = [w for w in arms[arm]["windows"] if w["tau_b"] is not None]
        records = arms[arm]["records"]
        start, end = last_window(records, report["window_s"])
        in_last = [r for r in records if r["complete"] and start <= r["arrival_s"] < end]
        tail = tau_with_ci(in_last)
        vs_static = (latency_ratio_with_ci(records, arms["static"]["records"], start, end) if "static" in arms
                     else {"ratio": None, "ci95": None, "n": 0})
        rise = None
        if ws:  # last window minus first, each resampled on its own: did live tau-b rise beyond the noise?
            first = [r for r in records if _scored(r) and ws[0]["start_s"] <= r["arrival_s"] < ws[0]["end_s"]]
            last = [r for r in in_last if _scored(r)]
            if len(last) >= MIN_WINDOW_REQUESTS:
                diff, lo, hi = tau_difference_ci(*(([r["score"] for r in rs], [r["length"] for r in rs])
                                                   for rs in (first, last)))
                rise = {"tau_b": round(diff, 4), "ci95": [round(lo, 4), round(hi, 4)]}
        gain = paired_gain(in_last)
        per_arm[arm] = {
            "tau_first_window": ws[0]["tau_b"] if ws else None, "ci95_first_window": ws[0]["ci95"] if ws else None,
            "tau_rise_first_to_last": rise,
            "tau_gain_over_start_last_window": gain,
            "tau_last_window": tail["tau_b"], "ci95_last_window": tail["ci95"],
            "last_window_s": [round(start, 1), round(end, 1)], "last_window_requests": tail["n"],
            "minutes_to_90pct_offline": minutes_to_fraction(ws, target),
            "last_window_latency_vs_static": vs_static["ratio"],
            "last_window_latency_vs_static_ci95": vs_static["ci95"],
            "train_share_of_busy": round(arms[arm]["train_share_of_busy"], 5),
            "head_versions": (arms[arm]["online"] or {}).get("online_accepted_version"),
        }
    head = per_arm.get("online-untrained") or next(iter(per_arm.values()), {})
    return {**{k: head.get(k) for k in ("tau_first_window", "tau_last_window", "minutes_to_90pct_offline",
                                       "train_share_of_busy", "last_window_latency_vs_static")},
            "offline_tau": offline, "offline_tau_ci95": report["offline_tau"]["ci95"],
            "mean_latency_s": {a: round(r["mean_latency_s"], 3) for a, r in arms.items()}, "arms": per_arm}


if __name__ == "__main__":
    main()
