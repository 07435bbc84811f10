"""`python -m ltr_jax.bench resimulate RUN_DIR...`: replay a real-engine run's exact traces in the simulator.

Owns the check of the simulator against real runs, and the split of ltr's gap to the oracle into its causes. For
each `bench run` report it rebuilds the very workload the run served (same prompts, lengths and Poisson arrivals,
from the run's own command), scores the prompts with the run's own ranker (and classifier), and simulates every
policy of the run with a step-time model taken from the run's own measurements:

* a prefill takes the unloaded probe's mean TTFT, in proportion to the prompt's tokens (those after the shared
  prefix, when the run cached the chat template's header);
* a decode step takes the unloaded TPOT with one request and, with every slot busy, what the fcfs run's busy
  time (its wall time in reports before `busy_s`) leaves after its prefills, per decode step (fcfs under load keeps
  every slot busy: its output tokens after the first / slots), linear in between;
* the ranker's pass takes the run's measured ranker milliseconds per request, as the same fraction of a prefill,
  charged at the boundary where each request arrives (and reused by its prefill when the run reused it). A run
  that fused passes into decode steps measured only their heads, so its charge is the mean over its passes run
  apart and its fused ones at their head's cost; what a fused pass adds to its step is not modelled.

Each ranking policy is simulated twice, with the ranker's pass free and charged, so the report separates what
ranking errors cost (free) from what the pass itself adds (charged), next to what the real engine measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltr_jax.bench import policy_bench
from ltr_jax.bench.combine import load_run
from ltr_jax.bench.report import write_summary
from ltr_jax.machine import machine_info
from ltr_jax.sim.simulator import simulate
from ltr_jax.sim.trace import TraceEntry, make_arrivals

RUN_PREFIX = "python -m ltr_jax.bench run "


@dataclass(frozen=True)
class RunStepTime:
    """The step-time model a run's own measurements give (see the module docstring)."""

    ttft_s: float  # unloaded prefill of a prompt of mean_prompt_len tokens
    mean_prompt_len: float
    tpot_alone_s: float  # decode step with one request
    tpot_full_s: float  # decode step with every slot busy
    slots: int
    shared_prefix_len: int = 0  # tokens of the cached header every prompt starts with (not run by its prefill)

    def prefill_time(self, n_tokens: int) -> float:
        p = self.shared_prefix_len
        return self.ttft_s * max(n_tokens - p, 1) / max(self.mean_prompt_len - p, 1.0)

    def decode_time(self, batch: int, tokens_in_cache: int) -> float:
        if self.slots <= 1:
            return self.tpot_full_s
        return self.tpot_alone_s + (self.tpot_full_s - self.tpot_alone_s) * (batch - 1) / (self.slots - 1)


def read_run(run_dir: Path) -> tuple[dict[str, Any], argparse.Namespace]:
    """The run's report and its command's arguments; a clear error when the directory is not a usable run."""
    path = run_dir / "report.json"
    if not path.is_file():
        raise SystemExit(f"{run_dir}: no report.json; pass directories written by `bench run --out DIR`")
    _, report = load_run(str(path))  # combine's reader: a damaged or incomplete report is a clear error
    if report.get("benchmark") != "policies on the real engine" or not report.get("command", "").startswith(RUN_PREFIX):
        raise SystemExit(f"{path}: not a `bench run` report (resimulate replays real-engine runs only)")
    if not report.get("unloaded"):
        raise SystemExit(f"{path}: the run has no unloaded probe (--unloaded-probe 0), so no measured prefill "
                         "and single-request step time to model it with; rerun it with --unloaded-probe 8")
    if report.get("arrival") == "burst":
        raise SystemExit(f"{path}: a burst/SDG run; resimulate replays Poisson or gamma runs")
    args = policy_bench.parse_args(shlex.split(report["command"][len(RUN_PREFIX):]))
    # what the run recorded wins over today's defaults for options its command left out
    starvation = report.get("starvation", {})
    # reports from before the fcfs-slack rule record a threshold and no rule
    rule = starvation.get("rule", "threshold" if "threshold_s" in starvation else None)
    recorded = {"max_preemptions": report.get("max_preemptions"), "preempt_mode": report.get("preempt_mode"),
                "starvation_rule": rule}
    if rule == "fcfs-slack":
        recorded["starvation_slack"] = starvation.get("slack_s")
        # reports from before these keys: the slack alone, the expected delay
        recorded["starvation_slack_share"] = starvation.get("slack_share", 0.0)
        recorded["starvation_estimate_sds"] = starvation.get("estimate_sds", 0.0)
    else:
        recorded.update(starvation_quantum=starvation.get("quantum_s"),
                        starvation_requeue=starvation.get("requeue_after_quantum"))
    for name, value in recorded.items():
        if value is not None:
            setattr(args, name, value)
    if rule == "fcfs-slack":  # reports from before these keys: 16 finished requests per score class, no reserve
        tree = args.config_tree
        starvation_cfg = dataclasses.replace(tree.scheduler.starvation,
                                             min_finished_per_class=starvation.get("min_finished_per_class", 16),
                                             slack_reserve=starvation.get("slack_reserve", 0.0))
        args.config_tree = dataclasses.replace(tree, scheduler=dataclasses.replace(tree.scheduler,
                                                                                   starvation=starvation_cfg))
    unrecorded = [name for name, value in recorded.items() if value is None]
    if unrecorded:
        print(f"{run_dir}: the report does not record {', '.join(unrecorded)}; using the command's values "
              f"(today's defaults where it gave none)", file=sys.stderr)
    return report, args


def step_model_of(report: dict[str, Any], runs: dict[str, Any], items) -> RunStepTime:
    """Prefill and single-request step from the unloaded probe; the full-batch step from the fcfs run's busy time
    less its prefills, over its decode steps (output tokens after the first / slots). A loaded run's mean TPOT
    would count other requests' prefills twice: they stall every running request's next token."""
    if "fcfs" not in runs:
        raise SystemExit("resimulate needs the run's fcfs policy: its busy time gives the full-batch decode step")
    unloaded, slots = report["unloaded"], report["slots"]
    model = RunStepTime(ttft_s=unloaded["ttft_s"], mean_prompt_len=report["mean_prompt_len"],
                        tpot_alone_s=unloaded["tpot_s"], tpot_full_s=unloaded["tpot_s"], slots=slots,
                        shared_prefix_len=report.get("shared_prefix_len") or 0)
    prefills = sum(model.prefill_time(len(i.prompt_tokens)) for i in items)
    steps = sum(i.output_len - 1 for i in items) / slots
    busy = runs["fcfs"].get("busy_s") or runs["fcfs"]["wall_s"]  # reports before busy_s: the run's wall time
    decode_floor = steps * model.tpot_alone_s  # a full-batch step is never faster than a one-request step
    ttft = model.ttft_s
    if busy < prefills + decode_floor:
        # the probe's TTFT also holds what busy time does not (the idle loop's wake-up, the first token's delivery),
        # which on a fast engine outweighs a prefill: scale the prefill to what the busy time leaves for it
        if not busy > decode_floor or not prefills > 0:
            raise SystemExit(f"{report.get('command')}: the fcfs run's busy time ({busy:.3g} s) is shorter than its "
                             f"decode steps at the unloaded step time ({decode_floor:.3g} s); it cannot be modelled")
        ttft *= (busy - decode_floor) / prefills
    full = (busy - prefills * ttft / model.ttft_s) / steps if steps else unloaded["tpot_s"]
    return RunStepTime(ttft, model.mean_prompt_len, model.tpot_alone_s, max(full, model.tpot_alone_s), slots,
                       model.shared_prefix_len)


def run_scores(report: dict[str, Any], kind: str, items, loaded, scorers: dict[str, Any],
               score_cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """The run's ranker (``kind`` "ranker") or classifier on each item's prompt: its score, and the most likely
    bucket for a classifier. Cached per prompt: the runs of one experiment serve the same prompts in other orders."""
    path = report.get(kind)
    if path not in scorers:
        from ltr_jax.models.ranker_checkpoint import load_scorer

        scorers[path] = load_scorer(path, model=loaded)  # a checkpoint serves one model: path is the key
    scorer = scorers[path]
    keys = [(path, tuple(i.prompt_tokens)) for i in items]
    missing = list(dict.fromkeys(k for k in keys if k not in score_cache))
    if missing:
        raw, outputs = scorer.raw([list(k[1]) for k in missing])
        classify = scorer.spec.method == "classify"
        for j, k in enumerate(missing):
            score_cache[k] = (float(raw[j]), int(np.argmax(outputs[j])) if classify else 0)
    return (np.array([score_cache[k][0] for k in keys]), np.array([score_cache[k][1] for k in keys]))


def simulate_mean(policy: str, report: dict[str, Any], args: argparse.Namespace, model: RunStepTime, items,
                  arrivals: np.ndarray, scores: np.ndarray, buckets: np.ndarray, ranker_fraction: float,
                  starvation_threshold: float | None = None) -> float:
    """Mean latency of ``policy`` on the run's engine (``model``) serving ``items`` at ``arrivals``, the ranker's
    pass costing ``ranker_fraction`` of a prefill (0: free)."""
    trace = [TraceEntry(float(a), len(i.prompt_tokens), i.output_len, float(s), int(b))
             for a, i, s, b in zip(arrivals, items, scores, buckets)]
    sched = policy_bench.make_scheduler(policy, report["slots"], args, starvation_threshold)
    result = simulate(trace, sched, model, preempt_mode=args.preempt_mode,
                      ranker_time=(lambda n: ranker_fraction * model.prefill_time(n)) if ranker_fraction else None,
                      ranker_reuse=bool(report.get("reuse_ranker_pass")))
    return float(np.mean([r.latency for r in result.records]))


def uses_ranker(policy: str, report: dict[str, Any], args: argparse.Namespace) -> bool:
    """Whether ``policy`` ranks by a predictor's scores (and so pays for its pass)."""
    return policy_bench.make_scheduler(policy, report["slots"], args, 1.0).policy.uses_ranker


def resimulate_run(run_dir: Path, models: dict[str | None, Any], scorers: dict[str, Any],
                   score_cache: dict) -> dict[str, Any]:
    report, args = read_run(run_dir)
    if args.model not in models:
        models[args.model] = policy_bench.load_serving_model(args.model)
    loaded = models[args.model]
    items, _ = policy_bench.build_items(loaded, args.prompts, args.lengths, args.n, args.max_prompt_tokens,
                                        args.max_output_tokens, args.split, args.seed, args.length_scale,
                                        held_out=policy_bench.held_out_split(policy_bench.workload_rankers(args)[0]))
    out: dict[str, Any] = {"run": str(run_dir), "command": report["command"], "rates": {}}
    for key, runs in report["runs"].items():
        rate = report["rates"][key]
        model = step_model_of(report, runs, items)
        arrivals = make_arrivals(args.arrival, len(items), rate, args.cv, seed=args.seed)
        row: dict[str, Any] = {"step_model": model.__dict__, "policies": {}}
        for policy, real in runs.items():
            uses = uses_ranker(policy, report, args)
            scores, buckets = run_scores(report, "classifier" if policy == "classify" else "ranker", items, loaded,
                                         scorers, score_cache) if uses \
                else (np.zeros(len(items)), np.zeros(len(items), int))
            entry = {"real_mean_s": real["latency_s"]["mean"]}
            costs = {"free": 0.0}
            if uses and real.get("ranker_ms_per_request"):
                costs["charged"] = ranker_fraction_of(real, model)
                entry["ranker_fraction_of_prefill"] = costs["charged"]
            for label, fraction in costs.items():
                entry[f"sim_{label}_mean_s"] = simulate_mean(policy, report, args, model, items, arrivals, scores,
                                                             buckets, fraction, real.get("starvation_threshold_s"))
            if "sim_charged_mean_s" not in entry:
                entry["sim_charged_mean_s"] = entry["sim_free_mean_s"]  # nothing to charge: no ranker pass
            row["policies"][policy] = entry
        out["rates"][key] = row
    return out


def ranker_fraction_of(real: dict[str, Any], model: RunStepTime) -> float:
    """A policy run's measured ranker time per request, as a fraction of the modelled mean prompt's prefill."""
    return (real.get("ranker_ms_per_request") or 0.0) / 1000 / model.prefill_time(model.mean_prompt_len)


def ratio_rows(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Pooled mean latency ratios (every request of every run counted once): real, simulated free, charged."""
    totals: dict[tuple[str, str], float] = {}
    for run in runs:
        for row in run["rates"].values():
            for policy, e in row["policies"].items():
                for col in ("real_mean_s", "sim_free_mean_s", "sim_charged_mean_s"):
                    totals[policy, col] = totals.get((policy, col), 0.0) + e[col]
    policies = sorted({p for p, _ in totals})
    out: dict[str, dict[str, float]] = {}
    for num, den in (("fcfs", "ltr"), ("ltr", "oracle-sjf"), ("fcfs", "oracle-sjf"), ("classify", "oracle-sjf"),
                     ("ltr+starvation", "oracle-sjf")):
        if num in policies and den in policies:
            out[f"{num}/{den}"] = {col: totals[num, col] / totals[den, col]
                                   for col in ("real_mean_s", "sim_free_mean_s", "sim_charged_mean_s")}
    return out


def markdown(result: dict[str, Any]) -> str:
    lines = ["# real-engine runs replayed in the simulator", "", result["note"], ""]
    lines += [("| run | rate | policy | real mean (s) | sim, ranker free (s) | sim, ranker charged (s) "
               "| ranker / prefill |"), "|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        for key, row in run["rates"].items():
            for policy, e in row["policies"].items():
                frac = e.get("ranker_fraction_of_prefill")
                lines.append(f"| {run['run']} | {key} | {policy} | {e['real_mean_s']:.2f} | {e['sim_free_mean_s']:.2f} "
                             f"| {e['sim_charged_mean_s']:.2f} | {'' if frac is None else f'{frac:.2f}'} |")
    lines += ["", "Pooled over the runs (every request counted once):", "",
              "| ratio of mean latencies | real engine | sim, ranker free | sim, ranker charged |", "|---|---|---|---|"]
    for name, r in result["pooled_ratios"].items():
        lines.append(f"| {name} | {r['real_mean_s']:.3f} | {r['sim_free_mean_s']:.3f} "
                     f"| {r['sim_charged_mean_s']:.3f} |")
    return "\n".join(lines) + "\n"


NOTE = ("Simulated with each run's own workload, arrivals, ranker scores and measured step times. 'ranker free': "
        "the ranker's pass costs nothing, so the gap to oracle-sjf is what ranking errors cost; 'ranker charged': "
        "each arrival's pass takes its measured time at the boundary where it arrives, as in the engine.")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.bench resimulate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="directories written by `bench run --out` (Poisson/gamma runs with an "
                   "unloaded probe and an fcfs policy; their model, prompts and ranker must still be at hand)")
    p.add_argument("--out", default=None, help="directory for report.json and report.md (default: print only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    models: dict[str | None, Any] = {}
    scorers: dict[str, Any] = {}
    cache: dict = {}
    runs = [resimulate_run(Path(d), models, scorers, cache) for d in args.runs]
    result = {"benchmark": "real-engine runs replayed in the simulator", "note": NOTE, "runs": runs,
              "pooled_ratios": ratio_rows(runs),
              "command": "python -m ltr_jax.bench resimulate " + " ".join(sys.argv[2:] if argv is None else argv),
              "machine": machine_info(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "wall_s": round(time.perf_counter() - t0, 1)}
    text = markdown(result)
    write_summary(result, text, args.out)
    print(text)
    return result
