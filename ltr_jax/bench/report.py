"""Benchmark reports: the Markdown table, the plots, the latency ratios and the files, for `run` and `simulate`
(and the two files of the reports built on them, `resimulate` and `project`).

Owns how a report (a dict with `runs[rate_key][policy] -> metrics`, `rates`, `model`, `arrival`, `command`,
`date`) is written: `report.json` (without the raw latency samples), `report.md` (one table per rate) and two
PNG plots (mean latency vs request rate per policy; latency CDF at the highest rate).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ltr_jax.scheduler.starvation import slack_for

#: what a `bench run` report's ``via`` says for each ``--via`` (reports from before ``--via`` ran in-process)
VIA_LABELS = {"engine": "engine in-process", "http": "HTTP server (this process, loopback, streaming)"}


def markdown_table(report: dict[str, Any]) -> str:
    lines = []
    for rate_key, per_policy in report["runs"].items():
        lines.append(f"\n### {rate_key}\n")
        lines.append("| policy | mean lat (s) | p50 | p90 | p99 | norm lat (s/tok) | TTFT mean | TPOT mean | "
                     "max wait p99 | max wait max | req/s | tok/s | preempt | promote | done |")
        lines.append("|---|" + "---|" * 14)
        for pol, r in per_policy.items():
            L, W = r["latency_s"], r["max_waiting_time_s"]
            lines.append(
                f"| {pol} | {L['mean']:.2f} | {L['p50']:.2f} | {L['p90']:.2f} | {L['p99']:.2f} | "
                f"{r['normalized_latency_s_per_token']['mean']:.3f} | {r['ttft_s']['mean']:.2f} | "
                f"{r['tpot_s']['mean']:.3f} | {W['p99']:.2f} | {W['max']:.2f} | {r['throughput_req_s']:.3f} | "
                f"{r['throughput_tok_s']:.1f} | {r['preemptions']} | {r['promotions']} | {r['completed']} |")
        overhead = [f"{pol} {r['ranker_ms_per_request']:.3g} ms/request ({r['ranker_share_of_busy_time']:.1%} of busy "
                    f"time; {r.get('reused_ranker_passes', 0)} prefills started from its pass; "
                    f"{r.get('fused_ranker_passes', 0)} passes ran inside a decode step)"
                    for pol, r in per_policy.items() if r.get("ranker_seconds")]
        if overhead:
            lines.append("\nranker overhead: " + "; ".join(overhead))
        compiled = {pol: r["engine_shapes_compiled_in_run"] for pol, r in per_policy.items()
                    if r.get("engine_shapes_compiled_in_run")}
        if compiled:  # warm-up missed these: their compile time is inside that policy's latencies
            lines.append("\nengine shapes compiled during the run (missed by warm-up): "
                         + ", ".join(f"{pol} {n}" for pol, n in compiled.items()))
        lags = {pol: r["send_lag_s"]["max"] for pol, r in per_policy.items() if r.get("send_lag_s")}
        if any(lag > 0.05 for lag in lags.values()):  # latencies still count from the scheduled arrivals
            lines.append("\nrequests sent after their scheduled arrival by up to: "
                         + ", ".join(f"{pol} {lag:.2f} s" for pol, lag in lags.items()))
        sdg = {pol: r["sdg"] for pol, r in per_policy.items() if r.get("sdg")}
        if sdg:
            lines.append("\n" + sdg_line(sdg))
        mean_ratios = ratios(per_policy)
        if mean_ratios:
            lines.append("\nmean-latency ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in mean_ratios.items()))
        kept = starvation_cost(per_policy, report.get("starvation"))
        if kept:
            lines.append("\n" + starvation_line(kept, report["starvation"].get("threshold_s")))
    if report.get("paper"):
        lines.append("\npaper: " + "; ".join(f"{k} {v}x" for k, v in report["paper"].items()))
    return "\n".join(lines) + "\n"


def sdg_line(sdg: dict[str, dict[str, Any]]) -> str:
    """The synthetic-data-generation result per policy, beside fcfs's: completions within the time budget (more is
    better), or seconds until the target count of completions (less is better)."""
    first, fcfs = next(iter(sdg.values())), sdg.get("fcfs", {})
    parts = []
    for pol, v in sdg.items():
        if "budget_s" in first:
            vs = f" ({v['completed'] / fcfs['completed']:.2f}x fcfs)" if fcfs.get("completed") and pol != "fcfs" else ""
            parts.append(f"{pol} {v['completed']}{vs}")
        elif v["seconds_to_target"] is None:
            parts.append(f"{pol} never (the run ended short of it)")
        else:
            took = v["seconds_to_target"]
            vs = (f" ({fcfs['seconds_to_target'] / took:.2f}x faster than fcfs)"
                  if fcfs.get("seconds_to_target") and pol != "fcfs" else "")
            parts.append(f"{pol} {took:.2f}{vs}")
    what = (f"completions within {first['budget_s']:g} s" if "budget_s" in first
            else f"seconds until {first['target']} completions")
    return f"synthetic data generation, {what}: " + ", ".join(parts)


def plots(report: dict[str, Any], out_dir: Path, cdf_samples: dict[str, list[float]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = list(report["runs"])
    policies = list(report["runs"][rates[0]])

    def figure(name: str, xlabel: str, ylabel: str, title: str, curves) -> str:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for label, xs, ys, marker in curves:
            ax.plot(xs, ys, marker=marker, label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        return name

    by_rate = [(pol, [report["rates"][k] for k in rates], [report["runs"][k][pol]["latency_s"]["mean"] for k in rates],
                "o") for pol in policies]
    cdfs = [(pol, np.sort(lat), np.arange(1, len(lat) + 1) / max(1, len(lat)), None)
            for pol, lat in cdf_samples.items()]
    return [
        figure("latency_vs_rate.png", "request rate (req/s)" if report["arrival"] != "burst" else "burst",
               "mean end-to-end latency (s)", f"{report['model']}: latency vs load", by_rate),
        figure("latency_cdf.png", "end-to-end latency (s)", "CDF", f"latency CDF at {rates[-1]}", cdfs),
    ]


def ratios(per_policy: dict[str, Any]) -> dict[str, float]:
    mean = {p: r["latency_s"]["mean"] for p, r in per_policy.items()}
    out = {}
    if "fcfs" in mean:
        for p, value in mean.items():
            if p != "fcfs" and value > 0:
                out[f"fcfs/{p}"] = mean["fcfs"] / value
    if mean.get("ltr", 0) > 0 and mean.get("oracle-sjf", 0) > 0:
        out["ltr/oracle-sjf"] = mean["ltr"] / mean["oracle-sjf"]
    return out


def starvation_cost(per_policy: dict[str, Any], starvation: dict[str, Any] | None) -> dict[str, Any] | None:
    """How much of ltr's gain starvation control gives back: the share of (fcfs - ltr) mean latency that
    ltr+starvation keeps, the worst max_waiting_time of each beside the rule's bound (fcfs-slack: fcfs's worst
    + slack; threshold: threshold + quantum) and promotions per request. None where ltr gains under 5% over fcfs."""
    if not starvation or not all(p in per_policy for p in ("fcfs", "ltr", "ltr+starvation")):
        return None
    mean = {p: per_policy[p]["latency_s"]["mean"] for p in ("fcfs", "ltr", "ltr+starvation")}
    gain = mean["fcfs"] - mean["ltr"]
    if not gain > 0.05 * mean["fcfs"]:  # no material gain to keep (an unloaded rate): a share would be noise
        return None
    guarded = per_policy["ltr+starvation"]
    worst = {p: per_policy[p]["max_waiting_time_s"]["max"] for p in ("fcfs", "ltr", "ltr+starvation")}
    out = {"share_of_ltr_gain_kept": (mean["fcfs"] - mean["ltr+starvation"]) / gain,
           "max_waiting_time_max_s": worst["ltr+starvation"], "ltr_max_waiting_time_max_s": worst["ltr"],
           "fcfs_max_waiting_time_max_s": worst["fcfs"], "rule": starvation.get("rule", "threshold")}
    if guarded.get("promotions") is not None and guarded.get("completed"):
        out["promotions_per_request"] = guarded["promotions"] / guarded["completed"]
    if out["rule"] == "fcfs-slack":
        out["slack_s"] = slack_for(starvation["slack_s"], starvation.get("slack_share", 0.0), worst["fcfs"])
        out["bound_s"] = worst["fcfs"] + out["slack_s"]
    else:
        out["threshold_s"] = guarded.get("starvation_threshold_s", starvation["threshold_s"])
        out["quantum_s"] = starvation["quantum_s"]
        out["bound_s"] = out["threshold_s"] + out["quantum_s"]
    return out


def starvation_line(kept: dict[str, Any], threshold_given: Any = None) -> str:
    """One sentence of `starvation_cost`'s result for a report."""
    share = kept["share_of_ltr_gain_kept"]
    if kept["rule"] == "fcfs-slack":
        rule = (f"rule fcfs-slack: bound fcfs's worst {kept['fcfs_max_waiting_time_max_s']:.2f} s + slack "
                f"{kept['slack_s']:g} s")
    else:
        fcfs_note = " (fcfs's worst wait)" if threshold_given == "fcfs" else ""
        rule = f"promotion threshold {kept['threshold_s']:g} s{fcfs_note} + quantum {kept['quantum_s']:g} s"
    promotions = (f"; {kept['promotions_per_request']:.3f} promotions per request"
                  if "promotions_per_request" in kept else "")
    return (f"ltr+starvation keeps {share:.1%} of ltr's mean-latency gain over fcfs (loses {1 - share:.1%}); max of "
            f"max_waiting_time {kept['max_waiting_time_max_s']:.2f} s "
            f"({'within' if kept['max_waiting_time_max_s'] <= kept['bound_s'] else 'over'} its bound "
            f"{kept['bound_s']:.2f} s), ltr alone {kept['ltr_max_waiting_time_max_s']:.2f} s; {rule}{promotions}")


def _json_default(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(type(x))


def write_report(report: dict[str, Any], out_dir: str | Path | None, header: str) -> str:
    """Print-ready JSON of the report (raw latency samples left out); with `out_dir`, also the files."""
    slim = {k: v for k, v in report.items() if k != "runs"}
    slim["runs"] = {k: {p: {m: x for m, x in r.items() if m != "latencies_s"} for p, r in v.items()}
                    for k, v in report["runs"].items()}
    text = json.dumps(slim, indent=2, default=_json_default)
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(text + "\n")
        (out / "report.md").write_text(f"# {report['benchmark']}\n\n`{report['command']}`\n\n{header}\n"
                                       + markdown_table(report))
        last = list(report["runs"])[-1]
        plots(report, out, {p: r["latencies_s"] for p, r in report["runs"][last].items()})
    return text


def write_summary(result: dict[str, Any], markdown_text: str, out_dir: str | Path | None) -> None:
    """With `out_dir`: ``result`` as report.json, and ``markdown_text`` as report.md under the result's command,
    date and machine (the reports of `resimulate` and `project`, which have no per-policy runs or plots)."""
    if not out_dir:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=2))
    (out / "report.md").write_text(f"`{result['command']}`\n\n{result['date']}, {result['machine']}\n\n"
                                   + markdown_text)
