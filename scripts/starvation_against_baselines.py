"""Issue 27's three points for `bench simulate` runs of ltr+starvation alone, against fcfs / ltr runs of the same
traces kept from an earlier run.

fcfs and ltr do not read ``scheduler.starvation``, so a change to the rule needs only its own policy rerun: the same
``--seed``, ``--rates``, ``--ranker`` / ``--prompts`` / ``--lengths`` give the same trace. For each rule run (a
directory ``bench simulate --policies ltr+starvation --out`` wrote) this finds the baseline report of the same seed
among ``--baselines`` (directories holding a report.json with fcfs and ltr runs at the same rate, and the same length
source) and prints, per rate and seed, what `bench`'s reports compute (`starvation_cost`): the share of ltr's
mean-latency gain over fcfs kept, the margin to the rule's promise (fcfs's worst max_waiting_time plus the slack the
rule run's config promises, less the rule's worst), the same margin against ``--old-slack S,SHARE`` when given, and
promotions per request; then a summary per rate. ``--json`` prints the rows as one JSON object instead.

    python scripts/starvation_against_baselines.py --runs 'DIR/rule_seed*' \
        --baselines 'benchmarks/results/starvation_sim_alpacaeval_v7_rate32_seed*' --old-slack 30,0.25
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

from ltr_jax.bench.report import starvation_cost
from ltr_jax.scheduler.starvation import slack_for

GAIN_POINT, PROMOTION_POINT = 0.9, 0.2


def _reports(pattern: str) -> list[tuple[Path, dict]]:
    return [(Path(d), json.loads((Path(d) / "report.json").read_text()))
            for d in sorted(glob.glob(pattern)) if (Path(d) / "report.json").is_file()]


def rows(runs: str, baselines: str, old_slack: tuple[float, float] | None) -> list[dict]:
    base = {}
    for path, report in _reports(baselines):
        for rate, by_policy in report["runs"].items():
            if {"fcfs", "ltr"} <= set(by_policy):
                base[(report["seed"], rate, report["length_source"])] = (path, by_policy)
    out = []
    for path, report in _reports(runs):
        starvation = report["starvation"]
        for rate, by_policy in report["runs"].items():
            key = (report["seed"], rate, report["length_source"])
            if key not in base:
                raise SystemExit(f"{path}: no baseline of seed {key[0]}, {rate} and this length source among "
                                 f"{baselines!r}")
            base_path, baseline = base[key]
            cost = starvation_cost({"fcfs": baseline["fcfs"], "ltr": baseline["ltr"],
                                    "ltr+starvation": by_policy["ltr+starvation"]}, starvation)
            if cost is None:
                continue  # ltr gains under 5% over fcfs at this rate: nothing to keep
            fcfs_worst, worst = cost["fcfs_max_waiting_time_max_s"], cost["max_waiting_time_max_s"]
            row = {"run": str(path), "baseline": str(base_path), "seed": report["seed"], "rate": rate,
                   "gain_kept": cost["share_of_ltr_gain_kept"], "margin_s": cost["bound_s"] - worst,
                   "promotions_per_request": cost["promotions_per_request"]}
            if old_slack is not None:
                row["margin_old_promise_s"] = fcfs_worst + slack_for(*old_slack, fcfs_worst) - worst
            row["meets"] = (row["gain_kept"] >= GAIN_POINT and row["margin_s"] >= 0
                            and row["promotions_per_request"] < PROMOTION_POINT)
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="glob of ltr+starvation run directories")
    parser.add_argument("--baselines", required=True, help="glob of run directories with fcfs and ltr")
    parser.add_argument("--old-slack", default=None, help="SLACK_S,SHARE: also the margin against this promise")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    old = tuple(float(x) for x in args.old_slack.split(",")) if args.old_slack else None
    table = rows(args.runs, args.baselines, old)
    if args.json:
        print(json.dumps({"rows": table}, indent=1))
        return
    for r in sorted(table, key=lambda r: (float(r["rate"].split("=")[1]), r["seed"])):
        old_text = f" (old promise {r['margin_old_promise_s']:6.1f} s)" if old else ""
        print(f"{r['rate']} seed {r['seed']:2d}: keeps {r['gain_kept']:.3f}, margin {r['margin_s']:6.1f} s{old_text}, "
              f"{r['promotions_per_request']:.3f} promotions per request{'' if r['meets'] else '  MISSES'}")
    for rate in sorted({r["rate"] for r in table}, key=lambda x: float(x.split("=")[1])):
        rr = [r for r in table if r["rate"] == rate]
        old_text = (f" (old promise: least {min(r['margin_old_promise_s'] for r in rr):.1f} s, "
                    f"{sum(r['margin_old_promise_s'] < 0 for r in rr)} past)") if old else ""
        print(f"{rate}: {sum(r['meets'] for r in rr)} of {len(rr)} meet; keeps {min(r['gain_kept'] for r in rr):.3f}-"
              f"{max(r['gain_kept'] for r in rr):.3f}; least margin {min(r['margin_s'] for r in rr):.1f} s{old_text}; "
              f"promotions {min(r['promotions_per_request'] for r in rr):.3f}-"
              f"{max(r['promotions_per_request'] for r in rr):.3f}")


if __name__ == "__main__":
    main()
