"""`python -m ltr_jax.train.label`: output-length labels from the serving model itself.

Owns the labeling job. It runs prompts through our own engine (continuous batching, FCFS, temperature 1.0 and a
fixed seed by default, as the paper labels with Llama-3) and appends one JSONL row per finished prompt:
`{"id", "prompt_tokens", "output_tokens", "finish_reason"}`. Rows are written as soon as each prompt finishes,
so an interrupted run resumes where it stopped: prompts already in the output file are skipped. Prompts are
processed in a fixed pseudo-random order (by a hash of their id), so a partial run is an unbiased sample.
Prompt text never goes into the file; the command and model that made it go into a `.meta.json` beside it.

The engine's keys come from the one config tree (`ltr_jax.config.EngineRunConfig`, read with ``--config`` and
``--set`` as ``serve`` reads them); ``--model`` and ``--slots`` are shorthands for ``model.source`` and
``engine.num_slots``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

from tqdm import tqdm

from ltr_jax.config import ConfigError, EngineRunConfig, load_config
from ltr_jax.config_schema import read_yaml_mapping
from ltr_jax.engine.engine import Engine
from ltr_jax.engine.orchestrator import Orchestrator, SamplingParams, StreamEvent
from ltr_jax.engine.sharding import init_distributed, mesh_for
from ltr_jax.models.llama import Llama
from ltr_jax.models.loading import load_model
from ltr_jax.scheduler.scheduler import Scheduler
from ltr_jax.train.data import load_examples

PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"


def label_order(example_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{example_id}".encode()).hexdigest()


def already_labeled(path: Path) -> set[str]:
    """Ids present in an existing output file; a torn last line (killed mid-write) is ignored and rewritten."""
    done: set[str] = set()
    if not path.exists():
        return done
    good_lines = []
    with open(path) as fh:
        for line in fh:
            try:
                row = json.loads(line)
                done.add(str(row["id"]))
                good_lines.append(line if line.endswith("\n") else line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
    with open(path, "w") as fh:
        fh.writelines(good_lines)
    return done


def finish_reasons(path: Path) -> dict[str, int]:
    """How the file's labels ended: "length" ones hit --max-tokens (right-censored), "stop" ones are exact."""
    counts: dict[str, int] = {}
    with open(path) as fh:
        for line in fh:
            reason = json.loads(line)["finish_reason"]
            counts[reason] = counts.get(reason, 0) + 1
    return counts


def write_trace_lengths(out: Path, todo, rendered: dict[str, list[int]], tok, args) -> None:
    """Rows with the reference answer's token count as the output length (finish_reason "reference")."""
    n = 0
    with open(out, "a") as fh:
        for ex in todo:
            if not ex.reference or len(rendered[ex.id]) > args.max_prompt_tokens:
                continue
            row = {"id": ex.id, "prompt_tokens": len(rendered[ex.id]),
                   "output_tokens": max(1, len(tok.encode(ex.reference))), "finish_reason": "reference"}
            fh.write(json.dumps(row) + "\n")
            n += 1
    print(json.dumps({"trace_length_rows": n, "out": str(out)}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.train.label", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="The packaged labels (ltr_jax/data/labels/smollm2_labels.jsonl) were made "
                                "with these defaults and --limit 2500 --slots 64 --max-tokens 384; their "
                                ".meta.json records the exact command.")
    p.add_argument("--prompts", default="shared", help="'shared' (../shared/data/prompts.jsonl), a JSON/JSONL "
                   "file (shared format or ShareGPT), or tfds:NAME[/SPLIT]")
    p.add_argument("--config", default=None, help="YAML config of the engine keys (the sections `serve` reads; "
                   "default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set engine.max_seq_len=4096 (repeatable)")
    p.add_argument("--model", default=None, help="model source (model.source; default: the embedded SmolLM2)")
    p.add_argument("--out", required=True, help="output JSONL (appended to; resumable). Writing into the "
                   "package's own ltr_jax/data/ needs --overwrite-package-data")
    p.add_argument("--overwrite-package-data", action="store_true",
                   help="allow --out inside ltr_jax/data/ (the packaged labels the shipped rankers were trained on)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="cap on generated tokens per prompt; a label that hits it is right-censored (its true "
                   "length is at least the cap), and the final report gives the share of capped labels")
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are skipped (as the paper)")
    p.add_argument("--temperature", type=float, default=0.2, help="sampling temperature: SmolLM2's model card "
                   "recommends 0.2 with top-p 0.9 (the packaged labels'); the paper samples Llama-3 at 1.0")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="sets the label order (a SHA-256 of seed:id, so --limit "
                   "takes the same random sample each run) and each prompt's sampling seed (seed plus a hash of its "
                   "id), so a prompt's answer does not depend on which other prompts run beside it")
    p.add_argument("--slots", type=int, default=None, help="decode slots, the batch size (engine.num_slots, "
                   "default 8; more slots label faster where the KV cache fits: the start line prints its size)")
    p.add_argument("--limit", type=int, default=None, help="label at most this many prompts (in label order)")
    p.add_argument("--trace-lengths", action="store_true", help="write trace lengths instead: the token count of "
                   "each prompt's reference answer under the model's tokenizer (vLLM's replay method; no engine run)")
    p.add_argument("--order", choices=["chunked", "random"], default="chunked",
                   help="'chunked': label order cut into chunks, each processed by prompt length (short caches, "
                   "and a partial run is still an unbiased sample); 'random': plain label order")
    p.add_argument("--chunk", type=int, default=384, help="chunk size for --order chunked")
    p.add_argument("--time-budget", type=float, default=None, help="stop admitting new prompts after this many s")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.model is not None:
        overrides.append(f"model.source={json.dumps(args.model)}")
    if args.slots is not None:
        overrides.append(f"engine.num_slots={args.slots}")
    try:
        cfg = load_config(args.config, overrides, EngineRunConfig)
    except ConfigError as err:
        p.error(str(err))
    out = Path(args.out).resolve()
    if out.is_relative_to(PACKAGE_DATA) and not args.overwrite_package_data:
        p.error(f"--out {args.out} is inside the package's data ({PACKAGE_DATA}), which holds the labels the "
                "packaged rankers were trained on: write elsewhere, or pass --overwrite-package-data")
    seq_len_given = any(o.split("=", 1)[0].strip() == "engine.max_seq_len" for o in overrides) or (
        args.config is not None and "max_seq_len" in (read_yaml_mapping(args.config).get("engine") or {}))
    if seq_len_given and args.max_tokens + 2 > cfg.engine.max_seq_len:  # before any model loads
        p.error(f"--max-tokens {args.max_tokens} does not fit the engine context engine.max_seq_len = "
                f"{cfg.engine.max_seq_len} even for a one-token prompt: lower it, or leave engine.max_seq_len "
                "unset (then it is sized to the prompts and --max-tokens)")
    args.model, args.slots = cfg.model.source, cfg.engine.num_slots

    from ltr_jax.engine.compilation_cache import enable_compilation_cache

    enable_compilation_cache(cfg.engine.compilation_cache_dir)
    init_distributed()  # a multi-host job joins before anything touches a device
    out.parent.mkdir(parents=True, exist_ok=True)
    done = already_labeled(out)
    loaded = load_model(args.model, dtype=cfg.model.dtype)
    tok = loaded.tokenizer
    examples = sorted(load_examples(args.prompts), key=lambda e: label_order(e.id, args.seed))
    if args.limit is not None:
        examples = examples[: args.limit]
    todo = [e for e in examples if e.id not in done]
    rendered = {e.id: tok.encode(tok.apply_chat_template([{"role": "user", "content": e.prompt}],
                                                         add_generation_prompt=True)) for e in todo}
    if args.order == "chunked":  # random chunks, each sorted by prompt length: a partial run is an unbiased
        # sample at chunk granularity, while similar lengths decode together and the cache (and each step) stays short
        todo = [e for i in range(0, len(todo), args.chunk)
                for e in sorted(todo[i:i + args.chunk], key=lambda e: len(rendered[e.id]))]
    kept = [len(rendered[e.id]) for e in todo if len(rendered[e.id]) <= args.max_prompt_tokens]
    needed = max(kept, default=1) + args.max_tokens + 2
    if not seq_len_given:  # the KV cache sized to these prompts and --max-tokens, not to the model's context
        seq = min(1 << (needed - 1).bit_length(), loaded.config.max_position_embeddings)
        cfg.engine = dataclasses.replace(cfg.engine, max_seq_len=seq,
                                         min_prefill_bucket=min(cfg.engine.min_prefill_bucket, seq))
    if needed > cfg.engine.max_seq_len:
        p.error(f"the longest prompt ({max(kept)} tokens) + --max-tokens {args.max_tokens} do not fit "
                f"engine.max_seq_len = {cfg.engine.max_seq_len}: lower --max-tokens or --max-prompt-tokens, or "
                f"raise it with --set engine.max_seq_len={1 << (needed - 1).bit_length()}")
    meta = {
        "command": "python -m ltr_jax.train.label " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": loaded.source and Path(loaded.source).name, "model_config": loaded.config.name,
        "max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p, "seed": args.seed,
        "max_prompt_tokens": args.max_prompt_tokens, "prompts": args.prompts, "limit": args.limit,
    }
    if args.trace_lengths:
        meta.update(temperature=None, top_p=None, seed=None, kind="trace lengths (reference answers' token counts)")
    Path(str(out) + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if args.trace_lengths:
        write_trace_lengths(out, todo, rendered, tok, args)
        return
    c = loaded.config
    kv_gib = args.slots * cfg.engine.max_seq_len * 2 * c.n_layers * c.n_kv_heads * c.head_dim * 4 / 2**30
    print(f"labeling {len(todo)} prompts ({len(done)} already in {out}) with {c.name}, {args.slots} slots, "
          f"max_tokens {args.max_tokens}, engine.max_seq_len {cfg.engine.max_seq_len} (KV cache at most "
          f"{kv_gib:.2f} GiB)", file=sys.stderr)
    if not todo:
        return

    engine = Engine(Llama.from_params(loaded.config, loaded.params), cfg.engine.to_engine_config(),
                    mesh=mesh_for(cfg.engine.mesh, loaded.config))
    orch = Orchestrator(engine, tok, Scheduler("fcfs", args.slots), max_queue=len(todo) + 1)
    lock = threading.Lock()
    finished = threading.Event()
    state = {"in_flight": 0, "skipped": 0, "tokens": 0}
    bar = tqdm(total=len(todo), desc="labeling", unit="prompt", dynamic_ncols=True)
    fh = open(out, "a")  # noqa: SIM115 - written from the callback thread, closed in the finally below

    def on_event(prompt_len: int, example_id: str, ev: StreamEvent) -> None:
        if not ev.finished:
            return
        with lock:
            if ev.finish_reason in ("stop", "length"):
                row = {"id": example_id, "prompt_tokens": prompt_len, "output_tokens": ev.num_generated,
                       "finish_reason": ev.finish_reason}
                fh.write(json.dumps(row) + "\n")
                fh.flush()
                state["tokens"] += ev.num_generated
            else:
                print(f"warning: {example_id} ended with {ev.finish_reason}: {ev.error}", file=sys.stderr)
            state["in_flight"] -= 1
            bar.update(1)
            bar.set_postfix(tok_s=f"{state['tokens'] / max(1e-9, time.monotonic() - t0):.0f}")
            if state["in_flight"] == 0:
                finished.set()

    t0 = time.monotonic()
    orch.start()
    try:
        for i, ex in enumerate(todo):
            if args.time_budget is not None and time.monotonic() - t0 > args.time_budget:
                print(f"time budget reached: {i} of {len(todo)} prompts submitted", file=sys.stderr)
                bar.total = i
                break
            ids = rendered[ex.id]
            if len(ids) > args.max_prompt_tokens:
                state["skipped"] += 1
                bar.update(1)
                continue
            while True:  # keep about two batches queued: bounded memory, slots always full
                with lock:
                    if state["in_flight"] < 2 * args.slots:
                        state["in_flight"] += 1
                        finished.clear()
                        break
                time.sleep(0.02)
            sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                      seed=(args.seed + int(label_order(ex.id, 0)[:8], 16)) % 2**32)
            orch.submit(ids, sampling, functools.partial(on_event, len(ids), ex.id), request_id=ex.id)
        with lock:
            if state["in_flight"] == 0:
                finished.set()
        finished.wait()
    finally:
        orch.stop(drain=False, timeout_s=30)
        bar.close()
        fh.close()
    elapsed = time.monotonic() - t0
    reasons = finish_reasons(out)
    print(json.dumps({"labeled": len(already_labeled(out)), "skipped_long_prompts": state["skipped"],
                      "finish_reasons": reasons,
                      "capped_share": round(reasons.get("length", 0) / max(1, sum(reasons.values())), 4),
                      "seconds": round(elapsed, 1), "generated_tokens": state["tokens"],
                      "tokens_per_s": round(state["tokens"] / max(elapsed, 1e-9), 1),
                      "engine": {"prefill_calls": engine.stats.prefill_calls,
                                 "compile_seconds": round(engine.compile_seconds, 1)}}))


if __name__ == "__main__":
    main()
