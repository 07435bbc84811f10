"""`python -m ltr_jax.bench combine`: pool several runs of one benchmark that differ only in their seed.

One trace decides a mean latency through a handful of requests that wait until the queue drains, so a ratio of two
means moves by 10% or more from one seed to the next. This command reads the `report.json` of each run (from
`bench run` or `bench simulate`), checks that the runs are the same experiment (same benchmark, model, length
source, arrival process, request count, slots, rates, policies, preemption cap, starvation settings and rankers)
on different seeds, and reports for every rate they all ran:

* each seed's mean latency per policy, its ratios, the share of ltr's gain ltr+starvation keeps, and whether that
  run's worst max_waiting_time stayed within its promotion threshold + quantum;
* the pooled mean latency per policy (every request of every seed counted once) and the ratios of those pooled
  means, with the lowest and highest per-seed value of each ratio beside them.

Runs of `bench online` pool per online arm instead: each seed's first and last window's live tau-b, their
difference and the last window's gain over the starting head on the same requests, and for those two the mean
over seeds with a Student-t 95% interval (one value per seed: a window of a hundred requests cannot resolve a rise
of a few hundredths, a dozen seeds can) and how many seeds rose.

Writes `combined.json` and `combined.md` to ``--out`` and prints the JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ltr_jax.bench.report import VIA_LABELS, ratios, starvation_cost

#: report fields that must be equal in every pooled run (else they are different experiments)
SAME_EXPERIMENT = ("benchmark", "model", "length_source", "arrival", "n", "slots", "temperature",
                   "max_preemptions", "preempt_mode", "starvation", "ranker", "classifier", "ranker_tau",
                   "classify_tau",
                   "step_model", "reuse_ranker_pass", "via", "score_per_boundary", "fuse_ranker_pass")


#: what a real-engine report written before a setting existed ran with: in-process (before `bench run --via`),
#: unfused (before `--fuse-ranker-pass`)
_REAL_ENGINE_DEFAULTS = {"via": VIA_LABELS["engine"], "fuse_ranker_pass": False}


def _setting(report: dict[str, Any], key: str) -> Any:
    """One experiment setting of a report (`_REAL_ENGINE_DEFAULTS` for real-engine reports older than it)."""
    if report.get("benchmark") == "policies on the real engine":
        return report.get(key, _REAL_ENGINE_DEFAULTS.get(key))
    return report.get(key)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.bench combine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("runs", nargs="+", help="output directories of `bench run`, `simulate` or `online` (each holding "
                   "report.json), or the report.json files themselves; one per seed")
    p.add_argument("--out", default=None, help="directory for combined.json and combined.md")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two runs to pool (one per seed)")
    return args


#: what `bench online` reports call themselves, and the fields its pooled runs must share
ONLINE_BENCHMARK = "online learning of the ranker on the real engine"
ONLINE_SAME_EXPERIMENT = ("benchmark", "model", "length_source", "stream", "n", "slots", "load", "window_s",
                          "offline_ranker", "mismatched_ranker", "online_config")


def load_run(path: str) -> tuple[str, dict[str, Any]]:
    file = Path(path)
    if file.is_dir():
        file = file / "report.json"
    if not file.is_file():
        raise SystemExit(f"{file}: no such report; give the --out directory of a `bench run` or `bench simulate` "
                         "run, or its report.json")
    try:
        report = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise SystemExit(f"{file}: not a JSON report ({err}); re-run the benchmark that wrote it") from None
    needed = ("benchmark", "arms", "seed") if report.get("benchmark") == ONLINE_BENCHMARK else \
        ("benchmark", "runs", "rates", "seed")
    missing = [k for k in needed if k not in report]
    if missing:
        raise SystemExit(f"{file}: report lacks {', '.join(missing)}; re-run it with this version of "
                         "`python -m ltr_jax.bench run`, `simulate` or `online`")
    return str(file), report


def check_same_experiment(runs: list[tuple[str, dict[str, Any]]]) -> None:
    first_file, first = runs[0]
    seen_seeds: dict[int, str] = {}
    online = first.get("benchmark") == ONLINE_BENCHMARK
    for file, report in runs:
        for key in ONLINE_SAME_EXPERIMENT if online else SAME_EXPERIMENT:
            mine, theirs = _setting(report, key), _setting(first, key)
            if mine != theirs:
                raise SystemExit(f"{file} and {first_file} differ in {key!r} ({mine!r} vs {theirs!r}): only runs "
                                 f"of one experiment on different seeds can be pooled")
        for rate_key in () if online else set(report["runs"]) & set(first["runs"]):
            if report["rates"][rate_key] != first["rates"][rate_key]:
                raise SystemExit(f"{file} and {first_file} disagree on {rate_key}")
            if list(report["runs"][rate_key]) != list(first["runs"][rate_key]):
                raise SystemExit(f"{file} and {first_file} ran different policies at {rate_key} "
                                 f"({list(report['runs'][rate_key])} vs {list(first['runs'][rate_key])})")
        if report["seed"] in seen_seeds:
            raise SystemExit(f"{file} and {seen_seeds[report['seed']]} both ran seed {report['seed']}: pooling a "
                             "trace twice counts it twice; give one run per seed")
        seen_seeds[report["seed"]] = file


def _within_bound(cost: dict[str, float] | None) -> dict[str, float] | None:
    if cost is None:
        return None
    bound = cost.get("bound_s", cost.get("threshold_s", 0.0) + cost.get("quantum_s", 0.0))
    return {"max_waiting_time_max_s": cost["max_waiting_time_max_s"], "bound_s": bound,
            "within": cost["max_waiting_time_max_s"] <= bound}


def pool_rate(rate_key: str, runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    per_seed = []
    totals: dict[str, list[float]] = {}  # policy -> [sum of latencies, completed requests]
    for file, report in runs:
        per_policy = report["runs"][rate_key]
        for pol, r in per_policy.items():
            acc = totals.setdefault(pol, [0.0, 0])
            acc[0] += r["latency_s"]["mean"] * r["completed"]
            acc[1] += r["completed"]
        cost = starvation_cost(per_policy, report.get("starvation"))
        per_seed.append({
            "seed": report["seed"], "report": file,
            "mean_latency_s": {p: r["latency_s"]["mean"] for p, r in per_policy.items()},
            "completed": {p: r["completed"] for p, r in per_policy.items()},
            "requests": {p: r.get("requests", r["completed"]) for p, r in per_policy.items()},
            "ratios": ratios(per_policy),
            "share_of_ltr_gain_kept": cost["share_of_ltr_gain_kept"] if cost else None,
            "starvation_bound": _within_bound(cost),
            "load": (report.get("load") or {}).get(rate_key),
        })
    pooled_mean = {p: s / n for p, (s, n) in totals.items() if n}
    pooled_policy = {p: {"latency_s": {"mean": m}} for p, m in pooled_mean.items()}
    pooled_ratios = ratios(pooled_policy)
    out: dict[str, Any] = {
        "rate": runs[0][1]["rates"][rate_key], "seeds": [s["seed"] for s in per_seed],
        "pooled_mean_latency_s": pooled_mean, "pooled_ratios": pooled_ratios,
        "ratio_range": {k: [min(s["ratios"][k] for s in per_seed), max(s["ratios"][k] for s in per_seed)]
                        for k in pooled_ratios if all(k in s["ratios"] for s in per_seed)},
        "incomplete": {p: int(sum(s["requests"][p] - s["completed"][p] for s in per_seed)) for p in pooled_mean},
        "per_seed": per_seed,
    }
    if all(p in pooled_mean for p in ("fcfs", "ltr", "ltr+starvation")):
        gain = pooled_mean["fcfs"] - pooled_mean["ltr"]
        bounds = [s["starvation_bound"] for s in per_seed]
        out["starvation"] = {
            "pooled_share_of_ltr_gain_kept": (pooled_mean["fcfs"] - pooled_mean["ltr+starvation"]) / gain
            if gain > 0 else None,
            "runs_within_bound": sum(1 for b in bounds if b and b["within"]),
            "runs_judged": sum(1 for b in bounds if b),
        }
    loads = [s["load"] for s in per_seed if s["load"] is not None]
    if loads:
        out["load_range"] = [min(loads), max(loads)]
    return out


def mean_with_t_ci(values: list[float]) -> dict[str, Any] | None:
    """Mean over seeds with a Student-t 95% interval, and how many values are above 0 (None: fewer than two)."""
    from scipy import stats

    if len(values) < 2:
        return None
    mean, sem = float(np.mean(values)), float(stats.sem(values))
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sem
    return {"mean": round(mean, 4), "ci95": [round(mean - half, 4), round(mean + half, 4)], "seeds": len(values),
            "above_zero": int(sum(v > 0 for v in values))}


def pooled_ratio(ratios: list[float]) -> dict[str, Any] | None:
    """Latency ratios of several seeds: their geometric mean with a Student-t 95% interval (on the logs), and how
    many seeds are within 10% (at most 1.10x)."""
    logs = mean_with_t_ci([float(np.log(r)) for r in ratios])
    if logs is None:
        return None
    return {"geometric_mean": round(float(np.exp(logs["mean"])), 3),
            "ci95": [round(float(np.exp(x)), 3) for x in logs["ci95"]], "seeds": logs["seeds"],
            "within_10pct": int(sum(r <= 1.10 for r in ratios))}


def pool_online(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """`bench online` runs: per online arm every run holds, each seed's headline numbers (`online_bench.summarize`,
    recomputed from the records, so a report written before a summary field existed has it too) and the mean over
    seeds of the rise first -> last window and of the paired gain over the starting head."""
    from ltr_jax.bench.online_bench import ONLINE_ARMS, summarize

    summaries = [(file, report, summarize(report)) for file, report in runs]
    arms = [a for a in ONLINE_ARMS if all(a in s["arms"] for _, _, s in summaries)]
    if not arms:
        raise SystemExit("the runs share no online arm; pool runs made with the same --arms")
    out = {}
    for arm in arms:
        per_seed = []
        for file, report, summary in summaries:
            a = summary["arms"][arm]
            per_seed.append({"seed": report["seed"], "report": file,
                             **{k: a[k] for k in ("tau_first_window", "ci95_first_window", "tau_last_window",
                                                  "ci95_last_window", "tau_rise_first_to_last",
                                                  "tau_gain_over_start_last_window", "minutes_to_90pct_offline",
                                                  "last_window_latency_vs_static", "train_share_of_busy")}})

        values = {key: [s[key]["tau_b"] for s in per_seed if s[key] is not None and s[key]["tau_b"] is not None]
                  for key in ("tau_rise_first_to_last", "tau_gain_over_start_last_window")}
        out[arm] = {"per_seed": per_seed, "rise_first_to_last": mean_with_t_ci(values["tau_rise_first_to_last"]),
                    "gain_over_start_last_window": mean_with_t_ci(values["tau_gain_over_start_last_window"]),
                    "last_window_latency_vs_static": pooled_ratio([s["last_window_latency_vs_static"] for s in per_seed
                                                                   if s["last_window_latency_vs_static"] is not None])}
    return out


def combine(paths: list[str]) -> dict[str, Any]:
    runs = [load_run(p) for p in paths]
    check_same_experiment(runs)
    first = runs[0][1]
    if first["benchmark"] == ONLINE_BENCHMARK:
        return {"benchmark": f"{first['benchmark']}, pooled over seeds", "model": first["model"],
                "length_source": first["length_source"], "stream": first["stream"], "n": first["n"],
                "slots": first["slots"], "load": first["load"], "window_s": first["window_s"],
                "seeds": [r["seed"] for _, r in runs], "reports": [f for f, _ in runs],
                "commands": [r.get("command") for _, r in runs],
                "machines": [json.loads(m) for m in sorted({json.dumps(r.get("machine"), sort_keys=True)
                                                            for _, r in runs})],
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "arms": pool_online(runs)}
    common = [k for k in first["runs"] if all(k in r["runs"] for _, r in runs)]
    if not common:
        raise SystemExit("the runs share no rate (" + "; ".join(f"{f}: {', '.join(r['runs'])}" for f, r in runs)
                         + "); pool runs made with the same --rates")
    left_out = sorted({k for _, r in runs for k in r["runs"]} - set(common))
    return {
        "benchmark": f"{first['benchmark']}, pooled over seeds", "model": first["model"],
        "length_source": first["length_source"], "arrival": first["arrival"], "n": first["n"],
        "slots": first["slots"], "starvation": first.get("starvation"), "max_preemptions": first["max_preemptions"],
        "seeds": [r["seed"] for _, r in runs], "reports": [f for f, _ in runs],
        "commands": [r.get("command") for _, r in runs],
        "machines": [json.loads(m) for m in sorted({json.dumps(r.get("machine"), sort_keys=True) for _, r in runs})],
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "rates": {k: pool_rate(k, runs) for k in common},
        "rates_not_in_every_run": left_out,
    }


def online_markdown(combined: dict[str, Any]) -> str:
    setup = (f"{combined['model']}; {combined['n']} requests per seed ({combined['stream']}), {combined['slots']} "
             f"slots, load {combined['load']}; seeds {', '.join(map(str, combined['seeds']))}; "
             f"{combined['length_source']}")
    lines = [f"# {combined['benchmark']}", "", setup, ""]
    for arm, pooled in combined["arms"].items():
        lines += [f"## {arm}", "", ("| seed | first window tau-b [95% CI] | last window | rise | gain over the "
                                    "starting head, same requests | minutes to 90% of offline | last window's "
                                    "latency / static's |"), "|---|---|---|---|---|---|---|"]
        for s in pooled["per_seed"]:
            rise, gain = s["tau_rise_first_to_last"] or {}, s["tau_gain_over_start_last_window"] or {}
            lines.append(f"| {s['seed']} | {s['tau_first_window']} {s['ci95_first_window']} | {s['tau_last_window']} "
                         f"{s['ci95_last_window']} | {rise.get('tau_b')} {rise.get('ci95')} | {gain.get('tau_b')} "
                         f"{gain.get('ci95')} | {s['minutes_to_90pct_offline']} | "
                         f"{s['last_window_latency_vs_static']} |")
        for key, label in (("rise_first_to_last", "rise"), ("gain_over_start_last_window", "gain")):
            p = pooled[key]
            if p:
                lines.append(f"\n{label}, mean over {p['seeds']} seeds: **{p['mean']:+.3f}** {p['ci95']} (Student-t "
                             f"95%); above 0 on {p['above_zero']} of {p['seeds']}")
        ratio = pooled["last_window_latency_vs_static"]
        if ratio:
            lines.append(f"\nlast window's latency / static's, geometric mean over {ratio['seeds']} seeds: "
                         f"**{ratio['geometric_mean']:.3f}x** {ratio['ci95']}; within 10% on {ratio['within_10pct']} "
                         f"of {ratio['seeds']}")
        lines.append("")
    return "\n".join(lines)


def markdown(combined: dict[str, Any]) -> str:
    if "arms" in combined:
        return online_markdown(combined)
    setup = (f"{combined['model']}; {combined['n']} requests per seed, {combined['slots']} slots, "
             f"{combined['arrival']} arrivals; seeds {', '.join(map(str, combined['seeds']))}; "
             f"{combined['length_source']}")
    machines = "; ".join(str(m) for m in combined["machines"] if m)
    lines = [f"# {combined['benchmark']}", "", setup + (f"; machine {machines}" if machines else ""), "",
             "Runs pooled:", ""]
    lines += [f"- `{c}`" for c in combined["commands"]]
    if combined["rates_not_in_every_run"]:
        lines += ["", f"Left out (not run on every seed): {', '.join(combined['rates_not_in_every_run'])}"]
    for rate_key, rate in combined["rates"].items():
        policies = list(rate["pooled_mean_latency_s"])
        ratio_keys = list(rate["pooled_ratios"])
        lines += ["", f"## {rate_key}", "",
                  "| seed | " + " | ".join(f"{p} mean (s)" for p in policies) + " | "
                  + " | ".join(ratio_keys) + " | ltr+starvation keeps | worst wait / bound (s) | load |",
                  "|---|" + "---|" * (len(policies) + len(ratio_keys) + 3)]
        for s in rate["per_seed"]:
            b = s["starvation_bound"]
            bound = (f"{b['max_waiting_time_max_s']:.1f} / {b['bound_s']:.1f}{'' if b['within'] else ' (over)'}"
                     if b else "-")
            kept = f"{s['share_of_ltr_gain_kept']:.1%}" if s["share_of_ltr_gain_kept"] is not None else "-"
            load = f"{s['load']:.1f}x" if s["load"] is not None else "-"
            lines.append(f"| {s['seed']} | " + " | ".join(f"{s['mean_latency_s'][p]:.2f}" for p in policies) + " | "
                         + " | ".join(f"{s['ratios'].get(k, float('nan')):.2f}x" for k in ratio_keys)
                         + f" | {kept} | {bound} | {load} |")
        starv = rate.get("starvation") or {}
        kept = starv.get("pooled_share_of_ltr_gain_kept")
        within = (f"{starv['runs_within_bound']} of {starv['runs_judged']} within"
                  if starv.get("runs_judged") else "-")
        kept_text = f"**{kept:.1%}**" if kept is not None else "-"
        lines.append("| **pooled** | " + " | ".join(f"**{rate['pooled_mean_latency_s'][p]:.2f}**" for p in policies)
                     + " | " + " | ".join(f"**{rate['pooled_ratios'][k]:.2f}x**" for k in ratio_keys)
                     + f" | {kept_text} | {within} | - |")
        spread = ", ".join(f"{k} {lo:.2f}-{hi:.2f}x" for k, (lo, hi) in rate["ratio_range"].items())
        lines += ["", f"pooled = every request of every seed counted once; per-seed range: {spread}"]
        incomplete = {p: n for p, n in rate["incomplete"].items() if n}
        if incomplete:
            lines.append(f"\nincomplete requests (left out of the means): {incomplete}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    combined = combine(args.runs)
    combined["command"] = "python -m ltr_jax.bench combine " + " ".join(sys.argv[2:] if argv is None else argv)
    text = json.dumps(combined, indent=2)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "combined.json").write_text(text + "\n")
        (out / "combined.md").write_text(markdown(combined))
    print(text)
    return combined
