"""`python -m ltr_jax.bench run`: every scheduling policy on the same trace against the real engine, in-process.

Owns the serving benchmark. One invocation builds one workload (prompts from the shared set or a ShareGPT file,
output lengths from the serving model's own label file or from reference-answer token counts, arrivals Poisson /
gamma / burst, or the synthetic-data-generation mode: a burst with a time budget or a target count of completions)
and replays it, with the same seed, under each policy: real prompts, the real ranker scoring each request at
arrival, real decode steps, each request generating exactly its recorded length (ignore_eos). With ``--via http``
each policy is served by the HTTP app on a loopback port and streaming clients replay the workload
(`ltr_jax.bench.http_replay`). Per policy it reports mean / P50 / P90 / P99 latency, normalized latency, TTFT,
TPOT, max_waiting_time = max(TTFT, max inter-token gap), throughput, preemptions, starvation promotions and ranker
overhead, as JSON, a Markdown table and PNG plots.

Policy names: fcfs, ltr, ltr+starvation, ltr-rescore, classify, oracle-sjf, oracle-srtf.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ltr_jax.bench.options import (
    SHARED_SHORTHANDS,
    Shorthand,
    add_shared_options,
    check_policies,
    resolve_config,
    resolve_threshold,
    starvation_config,
    starvation_report,
)
from ltr_jax.bench.report import VIA_LABELS, ratios, starvation_cost, write_report
from ltr_jax.bench.workload import Item, Observed, workload_capacity
from ltr_jax.engine.engine import Engine
from ltr_jax.engine.orchestrator import Orchestrator, SamplingParams, StreamEvent
from ltr_jax.engine.ranking import make_ranking_stage, share_prefix, warmup_ranker
from ltr_jax.engine.sharding import mesh_for
from ltr_jax.machine import machine_info
from ltr_jax.models.llama import Llama
from ltr_jax.models.ranker_checkpoint import default_ranker_path, load_scorer, read_spec
from ltr_jax.scheduler.metrics import distribution
from ltr_jax.scheduler.scheduler import Scheduler
from ltr_jax.sim.trace import make_arrivals

# Ranker batch sizes compiled before timing; the scorers batch no wider, so a burst of arrivals splits into these
# shapes instead of compiling a wider one mid-run.
RANKER_BATCHES = (1, 2, 4)

#: The run options that set config keys (see `ltr_jax.bench.options`); --fuse-ranker-pass sets ranker.fuse_max_len.
RUN_SHORTHANDS = SHARED_SHORTHANDS + (
    Shorthand("model", "model.source"),
    Shorthand("slots", "engine.num_slots"),
    Shorthand("max_seq_len", "engine.max_seq_len"),
    Shorthand("shared_prefix", "engine.shared_prefix"),
    Shorthand("compilation_cache", "engine.compilation_cache_dir"),
    Shorthand("reuse_ranker_pass", "ranker.reuse_pass"),
    Shorthand("score_per_boundary", "ranker.score_per_boundary"),
    Shorthand("fuse_max_len", "ranker.fuse_max_len"),
)


# ------------------------------------------------------------------------------------------------ workload
def prompt_pool(loaded, prompts_spec: str, lengths_spec: str, split: str,
                held_out: tuple[float, str] | None = None) -> tuple[list, dict[str, int], str]:
    """The examples a workload may draw from, their output lengths and where those lengths come from.

    ``lengths_spec``: 'reference' (the reference answers' token counts), 'outputs.NAME' (the answer recorded for
    model NAME, e.g. outputs.llama3-8b) or a label file of the serving model's own lengths; every length is
    replayed with ignore_eos. ``split`` 'validation' (the default) keeps the prompts a ranker trained with
    ``held_out`` = (val_fraction, split_salt) never saw (default: the packaged rankers' 0.1 and salt)."""
    from ltr_jax.train.data import DEFAULT_SPLIT_SALT, answer_lengths, is_validation, load_examples

    examples = load_examples(prompts_spec)
    lengths = answer_lengths(examples, lengths_spec, loaded.tokenizer, str(prompts_spec), every=False)
    if lengths_spec == "reference":
        source = "trace lengths: reference answers' token counts (replayed with ignore_eos)"
    elif lengths_spec.startswith("outputs."):
        source = f"trace lengths: token counts of the recorded {lengths_spec} answers (replayed with ignore_eos)"
    else:
        source = f"serving model's own output lengths from {lengths_spec}"
    pool = [e for e in examples if lengths.get(e.id, 0) >= 1]
    if split != "all":
        fraction, salt = held_out or (0.1, DEFAULT_SPLIT_SALT)
        want_val = split == "validation"
        pool = [e for e in pool if is_validation(e.id, fraction, salt) == want_val] or pool
    return pool, lengths, source


def held_out_split(ranker_path: str | None) -> tuple[float, str] | None:
    """(val_fraction, split_salt) the ranker at ``ranker_path`` was trained with, from its export; None when the
    export does not record them (then `prompt_pool` uses the packaged rankers' split)."""
    if ranker_path is None:
        return None
    trained = read_spec(ranker_path)[1].get("train_config") or {}
    if "val_fraction" not in trained:
        return None
    from ltr_jax.train.data import DEFAULT_SPLIT_SALT

    return float(trained["val_fraction"]), str(trained.get("split_salt", DEFAULT_SPLIT_SALT))


#: The packaged ranker (and classifier) for each kind of replayed length on the embedded model.
PACKAGED_RANKERS = {"reference": ("ranker_smollm2_trace", "ranker_smollm2_trace_classify"),
                    "labels": ("ranker_smollm2", "ranker_smollm2_classify"),
                    "outputs.llama3-8b": ("ranker_alpacaeval_llama3_8b", None)}


def workload_rankers(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """(ranker, classifier) checkpoint paths of a run: the flags, else on the embedded model the packaged ones
    trained on the kind of lengths the run replays."""
    ranker, classifier = args.ranker, args.classifier
    if args.model is None:
        kind = args.lengths if args.lengths in PACKAGED_RANKERS else (
            "labels" if not args.lengths.startswith("outputs.") else None)
        if kind is not None:
            packaged = default_ranker_path().parent
            names = PACKAGED_RANKERS[kind]
            ranker = ranker or str(packaged / names[0])
            classifier = classifier or (str(packaged / names[1]) if names[1] else None)
    return ranker, classifier


def build_items(loaded, prompts_spec: str, lengths_spec: str, n: int, max_prompt: int, max_output: int,
                split: str, seed: int, length_scale: float = 1.0, pool=None,
                held_out: tuple[float, str] | None = None, refill: bool = True) -> tuple[list[Item], str]:
    """Pick `n` prompts of the `prompt_pool` (or of ``pool``, what it returned for these arguments), in an order
    drawn with `seed`; a pool of fewer is sampled again with replacement (``refill``) or returned whole."""
    pool, lengths, source = pool or prompt_pool(loaded, prompts_spec, lengths_spec, split, held_out)
    tok = loaded.tokenizer
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    items: list[Item] = []
    for i in order:
        e = pool[int(i)]
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": e.prompt}]))
        if len(ids) > max_prompt:
            continue
        items.append(Item(e.id, ids, max(1, min(round(lengths[e.id] * length_scale), max_output))))
        if len(items) == n:
            break
    if refill and len(items) < n:  # small pools: sample again with replacement
        base = list(items)
        while len(items) < n and base:
            items.append(base[int(rng.integers(len(base)))])
    return items, source


def make_scheduler(policy: str, slots: int, args, starvation_threshold: float | None = None) -> Scheduler:
    starvation = None
    name = policy
    params: dict[str, Any] = {}
    if policy == "ltr+starvation":
        name = "ltr"
        if starvation_threshold is None and args.starvation_threshold != "fcfs":
            starvation_threshold = float(args.starvation_threshold)  # callers resolve 'fcfs' (resolve_threshold)
        starvation = starvation_config(args, starvation_threshold)
    from ltr_jax.scheduler.policies import make_policy, policy_parameters

    if "max_preemptions" in policy_parameters(name):  # the same cap for every preemptive policy
        params["max_preemptions"] = args.max_preemptions

    return Scheduler(make_policy(name, **params), slots, starvation=starvation)


def warm_up(engine: Engine, items: list[Item], rankers: list, reuse_ranker_pass: bool, fuse_max_len: int,
            swap: bool) -> float:
    """Compile every shape the workload's prefills, decode steps and ranker passes will use, so none compiles
    inside the timing; returns seconds spent."""
    t0 = time.monotonic()
    longest = max(len(i.prompt_tokens) + i.output_len for i in items)
    engine.warmup(prefill_buckets=sorted({engine.config.prefill_bucket(len(i.prompt_tokens) + i.output_len)
                                          for i in items} | {engine.config.prefill_bucket(len(i.prompt_tokens))
                                                             for i in items}),
                  cache_lens=engine.cache_buckets(longest + 1), transitions=True, swap=swap)
    prompts = [i.prompt_tokens for i in items]
    for r in rankers:  # every (batch, length) shape arrivals will use
        warmup_ranker(engine, r, r.pass_lengths(prompts), batch_sizes=RANKER_BATCHES,
                      reuse_ranker_pass=reuse_ranker_pass,
                      fused_shapes=[(s, t) for s, t in r.pass_shapes(prompts) if t <= fuse_max_len],
                      cache_lens=engine.cache_buckets(longest + 1))
    return time.monotonic() - t0


# ------------------------------------------------------------------------------------------------ one run
def run_policy(engine: Engine, tokenizer, ranker, policy: str, items: list[Item], arrivals: np.ndarray, args,
               desc: str, sequential: bool = False, starvation_threshold: float | None = None) -> dict[str, Any]:
    """Replay `items` at `arrivals` (seconds from start) under `policy`, in-process or over HTTP (``args.via``);
    `sequential` submits each request only after the previous one finished (an unloaded system)."""
    sched = make_scheduler(policy, engine.num_slots, args, starvation_threshold)
    ranker = ranker if sched.policy.uses_ranker else None
    ranking = None if ranker is None else make_ranking_stage(
        engine, ranker, reuse_pass=args.reuse_ranker_pass, fuse_pass=args.fuse_ranker_pass,
        state_budget_mb=args.config_tree.ranker.state_budget_mb)
    orch_kwargs = {"ranking": ranking, "max_queue": len(items) + 1, "preempt_mode": args.preempt_mode,
                   "score_per_boundary": args.score_per_boundary,
                   "swap_budget_mb": args.config_tree.engine.swap_budget_mb}
    compiled_before = engine.compiled_variants()  # a shape first met mid-run compiles inside the timing
    budget = None if sequential else args.sdg_budget  # the probes of an unloaded system run to their end
    target = None if sequential else args.sdg_target
    if args.via == "http":
        from ltr_jax.bench.http_replay import run_over_http as replay
    else:
        replay = run_in_process
    obs, wall, stats, reached_s = replay(engine, tokenizer, sched, orch_kwargs, policy, items, arrivals, args, desc,
                                         sequential=sequential, budget=budget, target=target)
    result = summarize_observed(obs, wall, stats, budgeted=bool(budget or target))
    result["engine_shapes_compiled_in_run"] = engine.compiled_variants() - compiled_before
    if budget:  # synthetic data generation: completions within the budget ...
        result["sdg"] = {"budget_s": budget, "completed": result["completed"]}
    elif target:  # ... or the seconds until the target count of completions (None: the run ended short of it)
        result["sdg"] = {"target": target, "seconds_to_target": reached_s}
    return result


def run_in_process(engine: Engine, tokenizer, scheduler: Scheduler, orchestrator_kwargs: dict[str, Any], policy: str,
                   items: list[Item], arrivals: np.ndarray, args, desc: str, sequential: bool = False,
                   budget: float | None = None, target: int | None = None
                   ) -> tuple[list[Observed], float, dict[str, Any], float | None]:
    """Submit the workload to an orchestrator in this process; returns (what each request saw, wall seconds, the
    orchestrator's counters, seconds until ``target`` completions or None)."""
    orch = Orchestrator(engine, tokenizer, scheduler, **orchestrator_kwargs)
    observed: dict[str, Observed] = {}
    lock = threading.Lock()
    done = threading.Event()
    remaining = [len(items)]
    completed = [0]
    reached: list[float] = []  # when the target count of completions was reached (SDG target mode)
    bar = tqdm(total=len(items), desc=desc, unit="req", leave=False, disable=not args.progress)

    def on_event(ev: StreamEvent) -> None:
        now = time.monotonic()
        with lock:
            ob = observed[ev.request_id]
            ob.token_times.extend([now] * len(ev.token_ids))
            if ev.finished:
                ob.finish, ob.reason = now, ev.finish_reason
                remaining[0] -= 1
                completed[0] += ev.finish_reason == "length"
                bar.update(1)
                if target and completed[0] == target:
                    reached.append(now)
                if remaining[0] == 0 or reached:
                    done.set()

    orch.start()
    t0 = time.monotonic()
    for i, (item, at) in enumerate(zip(items, arrivals)):
        delay = t0 + float(at) - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        rid = f"{i}-{item.id}"
        with lock:
            now = time.monotonic()
            observed[rid] = Observed(now if sequential else t0 + float(at), item.output_len, sent=now)
        sp = SamplingParams(max_tokens=item.output_len, temperature=args.temperature, seed=args.seed + i,
                            ignore_eos=True)
        orch.submit(item.prompt_tokens, sp, on_event, request_id=rid, true_output_len=item.output_len)
        while sequential and observed[rid].finish is None:
            time.sleep(0.005)
    if budget:
        done.wait(max(0.0, t0 + budget - time.monotonic()))
        orch.stop(drain=False, timeout_s=60)
    else:
        done.wait()
        orch.stop(drain=not target, timeout_s=60)
    bar.close()
    wall = time.monotonic() - t0
    return list(observed.values()), wall, orch.stats(), (reached[0] - t0 if reached else None)


def summarize_observed(obs: list[Observed], wall: float, stats: dict, budgeted: bool) -> dict[str, Any]:
    complete = [o for o in obs if o.reason == "length" and o.n_tokens == o.output_len and o.token_times]
    lat = [o.finish - o.submit for o in complete]
    ttft = [o.token_times[0] - o.submit for o in complete]
    tpot = [(o.token_times[-1] - o.token_times[0]) / (o.n_tokens - 1) for o in complete if o.n_tokens > 1]
    mwt = [max([o.token_times[0] - o.submit, *np.diff(o.token_times).tolist()]) for o in complete]
    tokens = sum(o.n_tokens for o in obs)
    busy = max(stats.get("busy_seconds", 0.0), 1e-9)
    out = {
        "requests": len(obs), "completed": len(complete), "wall_s": wall,
        # the loop's time in batch boundaries: ranker passes, prefills, decode steps
        "busy_s": stats.get("busy_seconds"),
        "incomplete_or_wrong_length": len(obs) - len(complete) if not budgeted else None,
        "latency_s": distribution(lat), "normalized_latency_s_per_token":
            distribution([x / o.output_len for x, o in zip(lat, complete)]),
        "ttft_s": distribution(ttft), "tpot_s": distribution(tpot), "max_waiting_time_s": distribution(mwt),
        "throughput_req_s": len(complete) / wall, "throughput_tok_s": tokens / wall,
        "preemptions": stats["preemptions"], "promotions": stats["promotions"],
        "ranker_seconds": stats["ranker_seconds"], "ranker_share_of_busy_time": stats["ranker_seconds"] / busy,
        # per request scored: fused passes count their head only (their blocks ran inside a decode step)
        "ranker_ms_per_request": 1e3 * stats["ranker_seconds"] / max(1, stats["ranker_requests"]
                                                                     + stats["fused_ranker_passes"]),
        "reused_ranker_passes": stats["reused_ranker_passes"],
        "fused_ranker_passes": stats["fused_ranker_passes"],
        "resumes_from_kept_kv": stats["swapped_in"], "resumes_recomputed": stats["recomputed_resumes"],
        "send_lag_s": distribution([o.sent - o.submit for o in obs if o.sent is not None]),
        "latencies_s": [round(x, 4) for x in lat],
    }
    return out


# ------------------------------------------------------------------------------------------------ CLI
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.bench run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model source (model.source): default the embedded SmolLM2; a "
                   ".gguf, a HF dir, 'tiny' (random test model) or preset:<name> (random weights of a published "
                   "shape)")
    p.add_argument("--prompts", default="shared", help="'shared', a JSON/JSONL file (shared or ShareGPT format)")
    p.add_argument("--lengths", default="reference", help="each request's output length, replayed with "
                   "ignore_eos: 'reference' (the reference answer's token count), 'outputs.NAME' (of the answer "
                   "recorded for model NAME, e.g. outputs.llama3-8b with ../shared/data/alpacaeval_llama3.jsonl) "
                   "or a label JSONL of the serving model's own lengths")
    p.add_argument("--labels", default=None, help="shorthand for --lengths LABEL_FILE")
    p.add_argument("--split", default="validation", choices=["validation", "train", "all"],
                   help="which prompts to draw from (validation = disjoint from the ranker's training split: the "
                   "val_fraction and salt its export records)")
    p.add_argument("--ranker", default=None, help="ranker checkpoint dir for ltr policies (default, embedded model "
                   "only: the packaged ranker trained on the kind of lengths the run replays: reference, a label "
                   "file, or outputs.llama3-8b)")
    p.add_argument("--classifier", default=None, help="10-bucket classifier checkpoint for the classify policy "
                   "(default, embedded model only: the packaged classifier matching the replayed lengths)")
    p.add_argument("--n", type=int, default=100, help="requests per run")
    p.add_argument("--arrival", default="poisson", choices=["poisson", "gamma", "burst"],
                   help="Poisson arrivals at each rate, gamma arrivals with --cv, or every request at t=0")
    sdg = p.add_mutually_exclusive_group()
    sdg.add_argument("--sdg-budget", type=float, default=None, help="synthetic-data-generation mode: burst of --n "
                     "requests, stop after this many seconds and count completions")
    sdg.add_argument("--sdg-target", type=int, default=None, help="synthetic-data-generation mode: burst of --n "
                     "requests, stop once this many have completed and report the seconds it took")
    p.add_argument("--via", default="engine", choices=list(VIA_LABELS), help="'engine': submit to the "
                   "orchestrator in-process; 'http': serve each policy with the HTTP app on a loopback port and "
                   "replay the workload as streaming /v1/completions clients (latency as a client sees it)")
    p.add_argument("--slots", type=int, default=None, help="decode slots (engine.num_slots)")
    p.add_argument("--max-seq-len", type=int, default=None, help="engine context per slot (prompt + output "
                   "tokens; a power of two; engine.max_seq_len)")
    p.add_argument("--max-prompt-tokens", type=int, default=512, help="prompts longer than this are left out "
                   "of the workload")
    p.add_argument("--max-output-tokens", type=int, default=384, help="cap on replayed output lengths")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiply every replayed length by this "
                   "(keeps their order and distribution shape; makes CPU runs affordable)")
    p.add_argument("--unloaded-probe", type=int, default=8, help="run this many requests one at a time first, "
                   "to state the unloaded latency the loaded runs are compared with (0 = skip)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of the replay")
    add_shared_options(p, rates="1.0")
    p.add_argument("--load-factors", default=None, help="comma-separated request rates as multiples of this "
                   "machine's measured capacity (replaces --rates): capacity = completions per second of a burst "
                   "of --capacity-probe requests under fcfs, so a load means the same thing on a faster machine")
    p.add_argument("--capacity-probe", type=int, default=64, help="requests in the capacity burst "
                   "(the workload's first ones)")
    p.add_argument("--reuse-ranker-pass", action=argparse.BooleanOptionalAction, default=None,
                   help="start each ranked prompt's prefill from the ranker's pass over its first blocks (when the "
                   "ranker's backbone is the served model's own), so ranking adds no model compute "
                   "(ranker.reuse_pass)")
    p.add_argument("--fuse-ranker-pass", action=argparse.BooleanOptionalAction, default=None,
                   help="while every slot is busy, run a waiting arrival's ranker pass inside the next decode step "
                   "(its rows share the backbone blocks' weight reads with the decode rows) instead of on its own "
                   "at arrival; needs --reuse-ranker-pass. Off by default: warm-up then compiles one such step per "
                   "prompt length and cache length (most common lengths first; compile times in "
                   "benchmarks/RESULTS.md). Each compiled step holds hundreds of memory mappings, so warm-up stops "
                   "before the process holds 75%% of Linux's vm.max_map_count (past it a compile fails) and the "
                   "lengths left out run their passes on their own; the report counts both (fused_steps_compiled, "
                   "fused_steps_skipped). On: "
                   "ranker.fuse_max_len = engine.max_seq_len (every length); off: 0 (the default)")
    p.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=None,
                   help="cache the K/V of the chat template's fixed header (default system prompt and user-turn "
                   "opening) in the engine and the rankers: every policy's prefills, and the rankers' passes, run "
                   "only the tokens after it (engine.shared_prefix)")
    p.add_argument("--score-per-boundary", type=int, default=None, help="arrivals the ranker scores per batch "
                   "boundary, oldest first (ranker.score_per_boundary; 0 = every arrival at once, as the simulator "
                   "models it): a burst is then ranked over several boundaries while the running requests decode")
    p.add_argument("--compilation-cache", default=None, help="JAX persistent compilation cache directory "
                   "(engine.compilation_cache_dir; 'default' = the user cache's jax_cache, as the server uses; "
                   "'none' = compile everything afresh): a repeated run then loads its warm-up's compiled shapes "
                   "instead of compiling them again")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bar (logs, CI)")
    p.set_defaults(fuse_max_len=None)  # set through --fuse-ranker-pass or --set ranker.fuse_max_len
    args = p.parse_args(argv)
    if args.labels is not None:
        if args.lengths != "reference":
            p.error(f"give --lengths or --labels, not both (--labels {args.labels} is --lengths {args.labels})")
        args.lengths = args.labels
    from ltr_jax.train.data import check_length_field

    if not (args.lengths.startswith("outputs.") or args.lengths == "reference" or Path(args.lengths).is_file()):
        p.error(f"--lengths {args.lengths!r}: {check_length_field(args.lengths)}; or give a label file that exists")
    if args.score_per_boundary is not None and args.score_per_boundary < 0:
        p.error(f"--score-per-boundary must be >= 0 (0 = every arrival at once), got {args.score_per_boundary}")
    if args.score_per_boundary == 0:  # 'every arrival at once' is the key's null
        args.overrides.append("ranker.score_per_boundary=null")
        args.score_per_boundary = None
    if args.compilation_cache == "none":
        args.overrides.append("engine.compilation_cache_dir=null")
        args.compilation_cache = None
    resolve_config(p, args, RUN_SHORTHANDS)
    if args.fuse_ranker_pass is not None:  # on: fuse passes of every length the context holds
        args.fuse_max_len = args.max_seq_len if args.fuse_ranker_pass else 0
        resolve_config(p, args, RUN_SHORTHANDS)
    args.fuse_ranker_pass = args.fuse_max_len > 0
    check_policies(p, args)
    if args.sdg_budget is not None and not args.sdg_budget > 0:
        p.error(f"--sdg-budget must be > 0 seconds, got {args.sdg_budget}")
    if args.sdg_target is not None and not 0 < args.sdg_target <= args.n:
        p.error(f"--sdg-target must be between 1 and --n ({args.n}), got {args.sdg_target}")
    if args.load_factors is not None:
        try:
            args.load_factors = [float(x) for x in args.load_factors.split(",")]
        except ValueError:
            p.error(f"--load-factors must be comma-separated numbers, got {args.load_factors!r}")
        if not all(f > 0 for f in args.load_factors):
            p.error(f"--load-factors must all be > 0, got {args.load_factors}")
        if args.capacity_probe < 1:
            p.error(f"--capacity-probe must be >= 1, got {args.capacity_probe}")
    return args


def _shown_path(path: str) -> str:
    """A checkpoint path as a report shows it: relative to the working directory when inside it."""
    from pathlib import Path

    p = Path(path).resolve()
    return str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)


def load_serving_model(source: str | None, dtype: str = "auto", weight_dtype: str = "auto", num_slots: int = 1):
    """The model as `serve` loads it: ``model.dtype``, and the weights' dtype ``model.weight_dtype`` picks for an
    engine of ``num_slots`` slots."""
    if source and source.startswith("preset:"):
        raise SystemExit("preset models have no tokenizer; use the `simulate` command or a real checkpoint")
    from ltr_jax.models.loading import load_model, resolve_weight_dtype

    return load_model(source, dtype=dtype, weight_dtype=resolve_weight_dtype(weight_dtype, dtype, num_slots))


def share_engine_weights(loaded, engine: Engine):
    """``loaded`` with the engine's own weight arrays (one copy, in the engine's dtype), as `serve` builds its
    rankers: their backbone blocks are then the engine's, so a ranker's pass can be the start of a prefill."""
    if engine.mesh is not None:
        return loaded
    return dataclasses.replace(loaded, params=Llama.state_params(engine.params))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    policies = args.policies.split(",")
    from ltr_jax.engine.compilation_cache import CompilationCacheError, enable_compilation_cache

    try:
        enable_compilation_cache(args.compilation_cache, key="--compilation-cache", off="'none'")
    except CompilationCacheError as err:
        raise SystemExit(str(err)) from None
    tree = args.config_tree
    loaded = load_serving_model(args.model, tree.model.dtype, tree.model.weight_dtype, tree.engine.num_slots)
    model = Llama.from_params(loaded.config, loaded.params)
    engine = Engine(model, tree.engine.to_engine_config(), mesh=mesh_for(tree.engine.mesh, loaded.config))
    loaded = share_engine_weights(loaded, engine)
    ranker_path, classifier_path = workload_rankers(args)
    items, length_source = build_items(loaded, args.prompts, args.lengths, args.n, args.max_prompt_tokens,
                                       args.max_output_tokens, args.split, args.seed, args.length_scale,
                                       held_out=held_out_split(ranker_path))
    if args.length_scale != 1.0:
        length_source += f", each scaled by {args.length_scale:g} (same order and shape, shorter run)"
    ranker = classifier = None
    if any(p in policies for p in ("ltr", "ltr+starvation", "ltr-rescore")):
        if ranker_path is None:
            raise SystemExit(f"the ltr policies on model {args.model!r} need --ranker <checkpoint trained for it>")
        ranker = load_scorer(ranker_path, model=loaded, max_batch=max(RANKER_BATCHES))
    if "classify" in policies:
        if not classifier_path:
            raise SystemExit("the classify policy needs --classifier <checkpoint of a 'classify' ranker>")
        classifier = load_scorer(classifier_path, model=loaded, max_batch=max(RANKER_BATCHES))
    shared = share_prefix(loaded.tokenizer.shared_prefix if args.shared_prefix else None, engine, ranker, classifier)
    print(f"warming up the engine ({len(items)} prompts, {args.slots} slots) ...", file=sys.stderr)
    warm_s = warm_up(engine, items, [r for r in (ranker, classifier) if r is not None], args.reuse_ranker_pass,
                     args.fuse_max_len, swap=args.preempt_mode == "swap")
    unloaded = None
    if args.unloaded_probe:
        probe = items[: args.unloaded_probe]
        alone = run_policy(engine, loaded.tokenizer, None, "fcfs", probe, np.zeros(len(probe)), args, "unloaded",
                           sequential=True)
        mean_len = float(np.mean([i.output_len for i in items]))
        unloaded = {
            "probe_requests": len(probe), "ttft_s": alone["ttft_s"]["mean"], "tpot_s": alone["tpot_s"]["mean"],
            "workload_mean_latency_s": alone["ttft_s"]["mean"] + alone["tpot_s"]["mean"] * (mean_len - 1),
            "how": "each probe request run alone; workload estimate = TTFT + TPOT x (mean output length - 1)",
        }
    capacity = None
    if args.arrival == "burst" or args.sdg_budget or args.sdg_target:
        rates = [None]
    elif args.load_factors:
        probe = items[: args.capacity_probe]
        full = run_policy(engine, loaded.tokenizer, None, "fcfs", probe, np.zeros(len(probe)), args, "capacity")
        capacity = {"requests": len(probe), "req_s": workload_capacity(probe, items, full["throughput_req_s"]),
                    "probe_req_s": full["throughput_req_s"], "tok_s": full["throughput_tok_s"],
                    "load_factors": args.load_factors,
                    "how": "a burst of the workload's first requests under fcfs: completions / wall time, scaled "
                           "by their mean output length over the workload's"}
        rates = [round(f * capacity["req_s"], 3) for f in args.load_factors]
        print(f"capacity {capacity['req_s']:.3f} req/s: rates {rates}", file=sys.stderr)
    else:
        rates = [float(r) for r in args.rates.split(",")]
    report: dict[str, Any] = {
        "benchmark": "policies on the real engine", "model": loaded.config.name, "source": loaded.source,
        "via": VIA_LABELS[args.via],
        "length_source": length_source, "arrival": "burst" if rates == [None] else args.arrival,
        "n": len(items), "slots": args.slots, "seed": args.seed, "temperature": args.temperature,
        "mean_output_len": float(np.mean([i.output_len for i in items])),
        "mean_prompt_len": float(np.mean([len(i.prompt_tokens) for i in items])),
        "command": "python -m ltr_jax.bench run " + " ".join(sys.argv[2:] if argv is None else argv),
        "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "warmup_s": round(warm_s, 1), "rates": {}, "runs": {},
        "starvation": starvation_report(args),
        "max_preemptions": args.max_preemptions, "preempt_mode": args.preempt_mode, "unloaded": unloaded,
        "capacity": capacity,
        "reuse_ranker_pass": args.reuse_ranker_pass, "score_per_boundary": args.score_per_boundary,
        "shared_prefix_len": shared, "fuse_ranker_pass": args.fuse_ranker_pass,
        "fused_steps_compiled": len(engine.fused_pass_shapes),
        "fused_steps_skipped": engine.stats.fused_variants_skipped,
        "ranker": _shown_path(ranker_path) if ranker is not None else None,
        "classifier": _shown_path(classifier_path) if classifier is not None else None,
    }
    for rate in rates:
        key = "burst" if rate is None else f"rate={rate:g}"
        arrivals = (np.zeros(len(items)) if rate is None
                    else make_arrivals(args.arrival, len(items), rate, args.cv, seed=args.seed))
        report["rates"][key] = 0.0 if rate is None else rate
        report["runs"][key] = {}
        for pol in policies:
            r = classifier if pol == "classify" else ranker
            threshold = resolve_threshold(args, report["runs"][key]) if pol == "ltr+starvation" else None
            res = run_policy(engine, loaded.tokenizer, r, pol, items, arrivals, args, desc=f"{key} {pol}",
                             starvation_threshold=threshold)
            if threshold is not None and report["starvation"]["rule"] == "threshold":
                res["starvation_threshold_s"] = threshold
            report["runs"][key][pol] = res
            print(json.dumps({"run": key, "policy": pol, "mean_latency_s": round(res["latency_s"]["mean"], 3),
                              "completed": res["completed"]}), file=sys.stderr)
    report["ratios"] = {k: ratios(v) for k, v in report["runs"].items()}
    report["starvation_cost"] = {k: starvation_cost(v, report["starvation"]) for k, v in report["runs"].items()}
    if unloaded and "fcfs" in policies:
        report["load"] = {k: v["fcfs"]["latency_s"]["mean"] / unloaded["workload_mean_latency_s"]
                          for k, v in report["runs"].items()}
        report["load_note"] = "fcfs mean latency / unloaded mean latency (>= 3 means the load queues)"
    header = f"{report['date']}, {report['machine']}\n\n{report['length_source']}"
    if args.via == "http":
        header += f"\n\nvia the {report['via']}: latencies as streaming clients saw them"
    if capacity:
        header += (f"\n\ncapacity {capacity['req_s']:.3f} req/s ({capacity['requests']} requests at once under fcfs); "
                   f"rates = {', '.join(f'{f:g}' for f in capacity['load_factors'])} x capacity")
    print(write_report(report, args.out, header))
    return report
