"""`python -m ltr_jax.bench simulate`: the policy report at paper scale, from the discrete-event simulator.

Owns the simulated benchmark: the very same `Scheduler` and policy objects as the real engine, replayed over
10k-request traces at several Poisson rates against a step-time model (analytic Llama-3-8B on one H100 by default,
or a JSON of measured engine step times). Output lengths come from the serving model's label file or the shared
prompts' reference answers; ranker scores are synthesized with a chosen Kendall tau (default: the tau the trained
ranker measured on held-out prompts). Writes the same JSON / Markdown / plots as `bench run`. The policy x rate
runs are independent and deterministic, so they run in worker processes, one per CPU (`--jobs`).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from typing import Any

import numpy as np

from ltr_jax.bench.options import (
    SHARED_SHORTHANDS,
    add_shared_options,
    check_policies,
    resolve_config,
    resolve_threshold,
    starvation_config,
    starvation_report,
)
from ltr_jax.bench.report import ratios, starvation_cost, write_report
from ltr_jax.machine import machine_info
from ltr_jax.scheduler.policies import policy_parameters
from ltr_jax.sim.simulator import simulate_policy
from ltr_jax.sim.step_time import AnalyticStepTime, MeasuredStepTime
from ltr_jax.sim.trace import load_lengths, make_trace

#: The packaged ranker's pass as a share of Llama-3-8B's prefill: 16 SmolLM2 blocks of 3.54M parameters each
#: (d=576: Q, K, V, O = 0.88M, SwiGLU MLP 3 x 576 x 1536 = 2.65M) = 56.6M of Llama-3-8B's 8.03B parameters, so of
#: its prefill FLOPs per token (both compute-bound at prefill).
RANKER_SHARE_OF_LLAMA3_8B = 16 * 3_538_944 / 8.03e9

PAPER = {"fcfs/ltr mean latency, LMSYS (Llama-3-8B, 64 req/s)": 6.9,
         "fcfs/ltr mean latency, ShareGPT (Llama-3-8B, 64 req/s)": 2.5}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.bench simulate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--labels", default=None, help="label JSONL (output_tokens per id); default: shared prompts' "
                   "reference answers (word count x 1.3)")
    p.add_argument("--prompts", default=None, help="prompts JSONL for reference lengths (default: the shared set)")
    p.add_argument("--lengths", default=None, help="with --ranker: each prompt's output length, 'reference', "
                   "'outputs.NAME' (e.g. outputs.llama3-8b with ../shared/data/alpacaeval_llama3.jsonl) or a label "
                   "file, as token counts under the ranker's model's tokenizer")
    p.add_argument("--ranker", default=None, help="score with this exported ranker instead of synthetic scores: "
                   "the trace draws from the --prompts the ranker held out of its training (its recorded split), "
                   "each with its real score and --lengths length, and the report gives that held-out tau")
    p.add_argument("--n", type=int, default=10000, help="requests per run")
    p.add_argument("--arrival", default="poisson", choices=["poisson", "gamma"],
                   help="Poisson arrivals at each rate, or gamma arrivals with --cv")
    p.add_argument("--tau", type=float, default=None, help="Kendall tau of the synthetic ranker scores "
                   "(default: the packaged ranker's measured held-out tau, else 0.55)")
    p.add_argument("--buckets", type=int, default=10, help="classes of the classify policy (S3: 10)")
    p.add_argument("--classify-tau", type=float, default=0.2, help="tau of the classifier's scores (paper ~0.2)")
    p.add_argument("--slots", type=int, default=64, help="decode slots of the modelled engine (64 x 8k-token "
                   "contiguous KV slots = 64 GiB beside 16 GB of bf16 weights on an 80 GB H100)")
    p.add_argument("--step-model", default="llama3-8b-h100",
                   help="'llama3-8b-h100' (analytic roofline) or a JSON of measured engine step times")
    p.add_argument("--ranker-cost", type=float, default=None,
                   help="the ranker's pass over an arriving prompt, as a fraction of that prompt's prefill time, "
                   "charged at the boundary where it arrives for the policies that rank (ltr, ltr+starvation, "
                   f"ltr-rescore, classify). Default: {RANKER_SHARE_OF_LLAMA3_8B:.4f} with the llama3-8b-h100 model "
                   "(the packaged 16-block SmolLM2 ranker's share of Llama-3-8B's parameters), 0 (not modelled) with "
                   "a measured one (benchmarks/RESULTS.md gives SmolLM2 serving itself on a CPU)")
    p.add_argument("--ranker-reuse", action=argparse.BooleanOptionalAction, default=False,
                   help="the ranker's pass is the first part of the prompt's prefill (its backbone is the served "
                   "model's first blocks, as with SmolLM2 serving itself), so that prefill costs the rest")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="runs (policy x rate) simulated at once, each in a process of its own; 1 = one after another "
                   "in this process. Every run is deterministic, so the report is the same for any value")
    add_shared_options(p, rates="2,8,16,32,48,64")
    args = p.parse_args(argv)
    resolve_config(p, args, SHARED_SHORTHANDS)
    check_policies(p, args)
    if (args.ranker is None) != (args.lengths is None):
        p.error("--ranker and --lengths go together: the ranker's real scores of --prompts with these lengths")
    if args.ranker is not None and (args.prompts is None or args.labels is not None or args.tau is not None):
        p.error("--ranker needs --prompts (the file whose held-out prompts it scores) and takes neither --labels "
                "(give the label file as --lengths) nor --tau (its tau is measured)")
    if args.jobs < 1:
        p.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.ranker_cost is not None and not (math.isfinite(args.ranker_cost) and 0 <= args.ranker_cost <= 1):
        p.error(f"--ranker-cost must be a fraction of a prefill in [0, 1], got {args.ranker_cost}")
    return args


def default_tau() -> tuple[float, str]:
    try:
        from ltr_jax.models.ranker_checkpoint import default_ranker_path, read_spec

        _, meta = read_spec(default_ranker_path())
        if meta.get("cv_kendall_tau_b"):
            return float(meta["cv_kendall_tau_b"]), "the packaged ranker's cross-validated Kendall tau"
        if meta.get("val_kendall_tau_b"):
            return float(meta["val_kendall_tau_b"]), "the packaged ranker's held-out Kendall tau"
    except Exception as err:  # noqa: BLE001 - no packaged ranker: fall back to a paper-like figure
        return 0.55, f"0.55 (no packaged ranker metadata: {err})"
    return 0.55, "0.55 (the packaged ranker's metadata has no tau)"


def ranked_held_out_prompts(ranker: str, prompts: str, lengths_spec: str
                            ) -> tuple[list[tuple[int, int]], list[float], str, dict[str, Any]]:
    """(prompt_len, output_len) pairs of the ``prompts`` the ``ranker`` held out of its training, the ranker's
    score of each, where the lengths come from, and the ranker's metrics on them."""
    from ltr_jax.bench.policy_bench import held_out_split
    from ltr_jax.models.loading import load_model
    from ltr_jax.models.ranker_checkpoint import load_scorer, read_spec
    from ltr_jax.train import data as train_data
    from ltr_jax.train.metrics import bootstrap_ci, tau_b

    spec, _ = read_spec(ranker)
    model = load_model(spec.model_source)
    examples = train_data.load_examples(prompts)
    fraction, salt = held_out_split(ranker) or (0.1, train_data.DEFAULT_SPLIT_SALT)
    held_out = [e for e in examples if train_data.is_validation(e.id, fraction, salt)]
    lengths = train_data.answer_lengths(held_out, lengths_spec, model.tokenizer, prompts, every=False)
    data = train_data.build_ranking_data(held_out, lengths, model.tokenizer, spec.max_prompt_len)
    scores = [float(x) for x in load_scorer(ranker, model).score(data.tokens)]
    measured = {"held_out_prompts": len(data), "kendall_tau_b": tau_b(np.asarray(scores), data.lengths),
                "ci95": list(bootstrap_ci(np.asarray(scores), data.lengths))}
    pairs = [(len(t), int(n)) for t, n in zip(data.tokens, data.lengths)]
    source = (f"{lengths_spec} token counts of the {len(data)} prompts of {prompts} that {ranker} held out "
              f"(val_fraction {fraction}), prompts tokenized by {spec.model_source or 'the embedded model'}")
    return pairs, scores, source, measured


def run(args: argparse.Namespace) -> dict[str, Any]:
    policies = args.policies.split(",")
    pool_scores = None
    if args.ranker is not None:
        pairs, pool_scores, length_source, measured = ranked_held_out_prompts(args.ranker, args.prompts,
                                                                              args.lengths)
        tau = measured["kendall_tau_b"]
        tau_source = (f"{args.ranker}'s real scores; its tau-b on the {measured['held_out_prompts']} held-out "
                      f"prompts, 95% CI [{measured['ci95'][0]:.3f}, {measured['ci95'][1]:.3f}]")
    else:
        pairs, length_source = load_lengths(args.labels, args.prompts)
        tau, tau_source = (args.tau, "--tau") if args.tau is not None else default_tau()
    if args.step_model == "llama3-8b-h100":
        step_model, step_desc = AnalyticStepTime.for_llama3_8b_h100(), "analytic: Llama-3-8B bf16, one H100 SXM"
    else:
        step_model, step_desc = MeasuredStepTime.from_json(args.step_model), f"fit of {args.step_model}"
    ranker_cost = args.ranker_cost
    if ranker_cost is None:
        ranker_cost = RANKER_SHARE_OF_LLAMA3_8B if args.step_model == "llama3-8b-h100" else 0.0
    report: dict[str, Any] = {
        "benchmark": "policies in the discrete-event simulator", "model": "Llama-3-8B step-time model",
        "step_model": step_desc, "length_source": length_source, "arrival": args.arrival, "n": args.n,
        "slots": args.slots, "seed": args.seed, "ranker_tau": tau, "ranker_tau_source": tau_source,
        "classify_tau": args.classify_tau,
        "max_preemptions": args.max_preemptions, "preempt_mode": args.preempt_mode,
        "ranker_cost": {"fraction_of_prefill": ranker_cost, "reused_by_prefill": bool(args.ranker_reuse),
                        "how": "each arrival's ranker pass runs at the boundary where it arrives, before the "
                               "schedule, for the policies that rank"},
        "starvation": starvation_report(args),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine_info(), "paper": PAPER, "rates": {},
        "trace_info": {}, "runs": {}, "jobs": args.jobs,
    }
    traces = {}
    for rate in [float(r) for r in args.rates.split(",")]:
        key = f"rate={rate:g}"
        trace, info = make_trace(pairs, args.n, rate, args.arrival, args.cv, tau, args.buckets, args.seed,
                                 scores_of_pairs=pool_scores)
        # the classifier sees the same requests through a weaker predictor (paper: ~0.2 tau for 10 buckets)
        ctrace, _ = make_trace(pairs, args.n, rate, args.arrival, args.cv, args.classify_tau, args.buckets,
                               args.seed)
        traces[key] = (trace, ctrace)
        report["rates"][key] = rate
        report["trace_info"][key] = info
    done: dict[tuple[str, str], dict] = {}

    def task(key: str, pol: str) -> tuple:
        name = "ltr" if pol == "ltr+starvation" else pol
        params = {"max_preemptions": args.max_preemptions} if "max_preemptions" in policy_parameters(name) else {}
        starvation = (starvation_config(args, resolve_threshold(args, {"fcfs": done.get((key, "fcfs"))}))
                      if pol == "ltr+starvation" else None)
        trace, ctrace = traces[key]
        return (ctrace if pol == "classify" else trace, name, params, starvation, args.slots, step_model,
                args.preempt_mode, ranker_cost, args.ranker_reuse)

    def run_all(tasks: dict[tuple[str, str], tuple]) -> None:
        """Simulate these runs (at most --jobs at once) into ``done``, printing each one as it ends."""
        def record(run_key: tuple[str, str], s: dict) -> None:
            done[run_key] = s
            print(json.dumps({"run": run_key[0], "policy": run_key[1], "mean_latency_s":
                              round(s["latency_s"]["mean"], 3), "sim_wall_s": s["sim_wall_s"]}), file=sys.stderr)

        if args.jobs == 1 or len(tasks) == 1:
            for run_key, t in tasks.items():
                record(run_key, simulate_policy(*t))
            return
        # spawned, not forked: this process runs JAX's threads (its machine description asked for the devices); the
        # workers import only the scheduler package, no JAX
        with ProcessPoolExecutor(min(args.jobs, len(tasks)), mp_context=multiprocessing.get_context("spawn")) as pool:
            futures: dict[Future, tuple[str, str]] = {pool.submit(simulate_policy, *t): k for k, t in tasks.items()}
            for future in as_completed(futures):
                record(futures[future], future.result())

    # ltr+starvation with the "fcfs" threshold needs the fcfs run of its rate first
    after_fcfs = args.starvation_threshold == "fcfs"
    run_all({(key, pol): task(key, pol)
             for key in traces for pol in policies if not (pol == "ltr+starvation" and after_fcfs)})
    if after_fcfs and "ltr+starvation" in policies:
        run_all({(key, "ltr+starvation"): task(key, "ltr+starvation") for key in traces})
    report["runs"] = {key: {pol: done[(key, pol)] for pol in policies} for key in traces}
    report["ratios"] = {k: ratios(v) for k, v in report["runs"].items()}
    report["starvation_cost"] = {k: starvation_cost(v, report["starvation"]) for k, v in report["runs"].items()}
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    t0 = time.perf_counter()
    report = run(args)
    report["command"] = "python -m ltr_jax.bench simulate " + " ".join(sys.argv[2:] if argv is None else argv)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    cost, machine = report["ranker_cost"], report["machine"]
    header = (f"{report['date']}; {report['step_model']}; {report['length_source']}; ranker tau "
              f"{report['ranker_tau']:.2f} ({report['ranker_tau_source']}); ranker pass "
              f"{cost['fraction_of_prefill']:.4g} of a prefill"
              f"{' (reused by it)' if cost['reused_by_prefill'] else ''}; {args.slots} slots; simulated on "
              f"{machine['cpu_model'] or machine['processor']} with {machine['cpu_count']} CPUs in "
              f"{report['wall_s']} s")
    print(write_report(report, args.out, header))
    return report
