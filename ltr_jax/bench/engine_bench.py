"""`python -m ltr_jax.bench engine`: the engine's decode step against the HBM roofline, prefill speed, compile time
and host overhead, per batch size and context.

    python -m ltr_jax.bench engine --preset llama3-8b --dummy-weights --layers 2 --dtype bfloat16 --json

For each context it times the prefill of one prompt of that many tokens, once per weights' dtype the rows use; for
each (batch, context) it fills every decode slot with that prompt, times ``--steps`` decode steps of the real engine
(median) and compares them with the roofline, the time to read every weight a step reads (all layers and the LM
head) plus the batch's K/V once at HBM bandwidth (``--hbm-gbps``, else a table of known devices, else measured
here by a large array reduction). Each batch runs with the weights' dtype ``model.weight_dtype`` picks for an
engine of that many slots. Beside each row: the weight bytes one token costs, the GB/s the step read its weights
and K/V at, and the bandwidth floor: the tokens/s that reading them at ``bandwidth_gbps``, the read bandwidth
measured in the same run, would allow. Then it serves ``batch`` one-token requests through the real orchestrator
for ``--host-steps`` steady steps and reports its host overhead: the time from one step's tokens reaching the host
to the next step's dispatch (streaming, scheduling, dispatch), and how much of it the decode pipeline leaves
exposed. Compile seconds are XLA's own compile events for that engine. Dummy-weight presets have no tokenizer:
their requests stream through the tiny model's byte-level one. The report's ``decode`` and ``prefill`` lists are
what `bench simulate --step-model REPORT.json` fits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ltr_jax.bench.options import add_config_options, resolve_config
from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.engine.orchestrator import Orchestrator, SamplingParams
from ltr_jax.engine.sharding import mesh_for
from ltr_jax.machine import machine_info
from ltr_jax.models.config import PRESET_ALIASES, PRESETS, LlamaConfig, preset
from ltr_jax.models.llama import Llama, init_random_params
from ltr_jax.models.loading import resolve_dtype, resolve_weight_dtype
from ltr_jax.scheduler.scheduler import Scheduler

# HBM bandwidth (GB/s) by a substring of `jax.Device.device_kind`, most specific first (vendor data sheets)
KNOWN_BANDWIDTH_GBPS = (
    ("H200", 4800.0), ("H100 PCIe", 2000.0), ("H100", 3350.0), ("A100-SXM4-80GB", 2039.0), ("A100", 1555.0),
    ("L4", 300.0), ("TPU v5 lite", 819.0), ("TPU v5p", 2765.0), ("TPU v6 lite", 1640.0), ("TPU v4", 1200.0),
)


def _significant(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (a tiny model's GB/s keeps its digits too)."""
    return float(f"{x:.{digits}g}")


def _median_time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_model(args, dtype: str) -> tuple[Llama, Any, str]:
    """(model, tokenizer or None, a name): a preset's shape with random weights, or real weights from a source;
    ``--layers`` keeps only the first N blocks."""
    if args.preset:
        if not args.dummy_weights:
            raise SystemExit("--preset builds random weights of a published shape: add --dummy-weights (real weights: "
                             "--model PATH)")
        try:
            config = preset(args.preset).replace(dtype=dtype)
        except ValueError as err:
            raise SystemExit(str(err)) from None
        if args.layers:
            config = config.replace(n_layers=min(args.layers, config.n_layers))
        return random_model(config, args.seed), None, f"{config.name} (random weights, {config.n_layers} layers)"
    from ltr_jax.models.loading import load_model

    loaded = load_model(args.model, dtype=dtype)
    config, params = loaded.config, loaded.params
    if args.layers and args.layers < config.n_layers:
        config = config.replace(n_layers=args.layers)
        params = {**params, "layers": params["layers"][: args.layers]}
    return Llama.from_params(config, params), loaded.tokenizer, config.name


def random_model(config: LlamaConfig, seed: int = 0) -> Llama:
    """Random weights generated on the device (a 16 GB model never passes through host numpy)."""
    if config.num_params() < 5e8:
        return Llama.from_params(config, init_random_params(config, seed))
    from flax import nnx

    return nnx.jit(lambda: Llama(config, nnx.Rngs(seed)))()


def step_weight_bytes(config: LlamaConfig) -> int:
    """Bytes of weights a decode step reads: every block, the final norm and the LM head (an untied embedding
    table is only gathered, a row per slot)."""
    unread = 0 if config.tie_embeddings else config.vocab_size * config.dim
    return (config.num_params() - unread) * jnp.dtype(config.param_dtype).itemsize


def kv_bytes_per_token(config: LlamaConfig) -> int:
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * jnp.dtype(config.dtype).itemsize


def read_bandwidth(probes: int = 5) -> float:
    """GB/s this device reads at, measured: the fastest of ``probes`` sums of a 256 MiB float32 array (far past any
    cache). The fastest, so that background load on a shared machine lowers no floor computed from it."""
    x = jnp.ones((64 * 2**20,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    seconds = []
    for _ in range(probes):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        seconds.append(time.perf_counter() - t0)
    return round(x.nbytes / min(seconds) / 1e9, 2)


def hbm_bandwidth(given: float | None, measured: float) -> tuple[float, str]:
    """(GB/s, where it came from) for the roofline: ``--hbm-gbps``, the device's data-sheet figure, or ``measured``
    (`read_bandwidth`)."""
    if given:
        return given, "--hbm-gbps"
    kind = jax.devices()[0].device_kind
    for name, gbps in KNOWN_BANDWIDTH_GBPS:
        if name in kind:
            return gbps, f"data sheet ({kind})"
    return measured, f"measured (the fastest of 256 MiB float32 sums on {kind})"


def profile_rows(profile, steps: int, top: int) -> list[dict[str, Any]]:
    """The ``top`` functions by own time in a cProfile of the serving run, per decode step."""
    import pstats

    stats = pstats.Stats(profile).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"function": f"{Path(f).name}:{line}({name})", "calls_per_step": round(nc / steps, 2),
             "own_us_per_step": round(tt / steps * 1e6, 1), "cumulative_us_per_step": round(ct / steps * 1e6, 1)}
            for (f, line, name), (_, nc, tt, ct, _) in rows]


def host_overhead(engine: Engine, tokenizer, prompt: list[int], steps: int, step_s: float,
                  profile_top: int = 0) -> dict[str, Any]:
    """Serve one request per slot (``prompt``, so the cache starts as long as in the timed steps; its first tokens are
    the engine's cached shared prefix, so each prefill runs one token) through the real orchestrator for ``steps``
    steady decode steps. Host time per step: dispatch-to-dispatch seconds minus those blocked reading tokens
    (streaming, scheduling, dispatch); exposed: how much longer a serving step takes than the bare step
    ``step_s`` (what pipelining leaves of the host time; the serving run's cache grows past the timed one's when
    ``steps`` is long)."""
    slots = engine.num_slots
    for slot in range(slots):
        if engine.host_active[slot]:
            engine.free(slot)
    engine.set_shared_prefix(prompt[:-1])
    cfg = engine.config  # compile every cache length (and resize) the run passes through, so none compiles in it
    lens = [n for n in engine.cache_buckets(len(prompt) + steps + 4) if n >= cfg.cache_bucket(len(prompt) + 1)]
    engine.warmup(prefill_buckets=[cfg.prefill_bucket(1)], cache_lens=lens, transitions=True)
    orch = Orchestrator(engine, tokenizer, Scheduler("fcfs", slots), max_queue=slots + 1)
    sampling = SamplingParams(max_tokens=steps + 3, temperature=0.0, ignore_eos=True)
    for _ in range(slots):
        orch.submit(prompt, sampling, lambda ev: None)
    profile = None
    if profile_top:
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    orch.run_until_idle()
    if profile is not None:
        profile.disable()
    s = orch.stats()
    n = max(1, s["steady_steps"])
    per_step = s["steady_step_seconds"] / n
    return {"host_overhead_ms": round((s["steady_step_seconds"] - s["steady_wait_seconds"]) / n * 1e3, 4),
            "serving_step_ms": round(per_step * 1e3, 3), "exposed_host_ms": round((per_step - step_s) * 1e3, 4),
            "host_steps": int(s["steady_steps"]), "decode_pipeline": engine.config.decode_pipeline,
            **({"host_profile": profile_rows(profile, int(s["steps"]), profile_top)} if profile else {})}


def prefill_rate(model: Llama, context: int, max_len: int, mesh) -> dict[str, float]:
    """Tokens/s of one prompt's prefill (compiled first), and that compile's seconds."""
    engine = Engine(model, EngineConfig(num_slots=1, max_seq_len=max_len, prefill_batch=1), mesh=mesh)
    prompt = np.random.default_rng(context).integers(0, model.config.vocab_size, size=context).tolist()
    jax.block_until_ready(engine.prefill(prompt, SlotSampling()).token)
    compile_s = engine.compile_seconds
    seconds = _median_time(lambda: engine.prefill(prompt, SlotSampling()).token, 2)
    return {"prefill_tokens_per_s": round(context / seconds, 1), "prefill_ms": round(seconds * 1e3, 2),
            "prefill_compile_s": round(compile_s, 2)}


def bench_point(model: Llama, tokenizer, batch: int, context: int, args, bandwidth: float, read_gbps: float, mesh,
                prefill: dict[str, float]) -> dict[str, Any]:
    c = model.config
    longest = context + max(args.steps, args.host_steps) + 4
    max_len = 1 << max(8, longest.bit_length())
    engine = Engine(model, EngineConfig(num_slots=batch, max_seq_len=max_len, min_prefill_bucket=4,
                                        prefill_batch=args.prefill_batch, decode_pipeline=args.decode_pipeline),
                    mesh=mesh)
    prompt = np.random.default_rng(batch).integers(0, c.vocab_size, size=context).tolist()
    prefix = engine.prefill(prompt, SlotSampling())
    for slot in range(batch):
        engine.insert(prefix, slot)
    attend = engine.config.cache_bucket(context + args.steps + 2)  # one cache length for every timed step
    engine.resize_cache(attend)
    engine.generate().block_until_ready()  # compile
    compile_s = engine.compile_seconds
    step_s = _median_time(engine.generate, args.steps)
    assert engine.cache_len == attend
    weights, kv = step_weight_bytes(c), batch * (context + args.steps // 2) * kv_bytes_per_token(c)
    roofline_s = (weights + kv) / (bandwidth * 1e9)
    floor_tokens_per_s = batch / ((weights + kv) / (read_gbps * 1e9))
    row = {
        "batch": batch, "context": context, "weight_dtype": c.param_dtype, "cache_len": attend,
        "step_ms": round(step_s * 1e3, 3),
        "tokens_per_s": round(batch / step_s, 1), "roofline_ms": round(roofline_s * 1e3, 4),
        "step_over_roofline": round(step_s / roofline_s, 2), "weight_bytes": weights, "kv_bytes_read": kv,
        # what one token costs in weight reads, the rate the step read its weights and K/V at, and the tokens/s
        # that reading them at the measured bandwidth would allow
        "weight_bytes_per_token": weights // batch, "achieved_gbps": _significant((weights + kv) / step_s / 1e9),
        "bandwidth_floor_tokens_per_s": _significant(floor_tokens_per_s),
        "share_of_floor": _significant(batch / step_s / floor_tokens_per_s),
        "compile_s": round(compile_s, 2), **prefill,
    }
    if args.host_steps and context == args.host_context:  # host work does not depend on the context: measured
        # at one, it spares the serving run's compiles at the others
        row.update(host_overhead(engine, tokenizer, prompt, args.host_steps, step_s, args.profile_host))
    return row


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.bench engine", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="real weights: null = embedded SmolLM2, a .gguf or HF directory")
    p.add_argument("--preset", default=None, help="a published shape with random weights (needs --dummy-weights): "
                   f"tiny, {', '.join(PRESET_ALIASES)} (or {', '.join(PRESETS)})")
    p.add_argument("--dummy-weights", action="store_true", help="random weights of the --preset's shape")
    p.add_argument("--layers", type=int, default=None, help="keep only the first N blocks (CPU smoke runs)")
    p.add_argument("--dtype", default=None, choices=("auto", "float32", "bfloat16"),
                   help="model.dtype (default: the config's, auto = bfloat16 on GPU/TPU, float32 on CPU)")
    p.add_argument("--weight-dtype", default=None, choices=("auto", "float32", "bfloat16"),
                   help="model.weight_dtype (default: the config's)")
    p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (decode slots)")
    p.add_argument("--contexts", default="128", help="comma-separated tokens already in each slot's cache")
    p.add_argument("--steps", type=int, default=3, help="timed decode steps per point (median reported)")
    p.add_argument("--host-steps", type=int, default=8, help="steady orchestrator steps measuring host overhead, "
                   "at each batch size and the first context (0 = skip)")
    p.add_argument("--profile-host", type=int, default=0, metavar="N", help="cProfile the serving run and report "
                   "its N functions with the most own time, per step (profiling slows it: the host times then "
                   "overstate)")
    p.add_argument("--hbm-gbps", type=float, default=None, help="memory bandwidth for the roofline (default: the "
                   "device's data-sheet figure if known, else measured)")
    p.add_argument("--seed", type=int, default=0, help="random weights' seed")
    p.add_argument("--json", action="store_true", help="print only the JSON report")
    p.add_argument("--out", default=None, help="also write the JSON here")
    add_config_options(p)
    args = p.parse_args(argv)
    if args.dtype is not None:
        args.overrides = [*args.overrides, f"model.dtype={args.dtype}"]
    if args.weight_dtype is not None:
        args.overrides = [*args.overrides, f"model.weight_dtype={args.weight_dtype}"]
    if args.steps < 1 or args.host_steps < 0:
        p.error("--steps must be >= 1 and --host-steps >= 0")
    resolve_config(p, args, ())
    args.prefill_batch = args.config_tree.engine.for_backend(jax.default_backend()).prefill_batch
    args.decode_pipeline = args.config_tree.engine.decode_pipeline
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    tree = args.config_tree
    dtype = resolve_dtype(tree.model.dtype)
    t0 = time.perf_counter()
    model, tokenizer, name = build_model(args, dtype)
    if tokenizer is None:
        from ltr_jax.models.tiny import byte_level_tokenizer

        tokenizer = byte_level_tokenizer()
    init_s = time.perf_counter() - t0
    mesh = mesh_for(tree.engine.mesh, model.config)
    read_gbps = read_bandwidth()
    bandwidth, bandwidth_source = hbm_bandwidth(args.hbm_gbps, read_gbps)
    batches = [int(b) for b in args.batches.split(",")]
    contexts = [int(n) for n in args.contexts.split(",")]
    args.host_context = contexts[0]
    results = []
    models = {model.config.weight_dtype: model}  # by weights' dtype, which `model.weight_dtype` picks per batch

    def model_for(batch: int) -> Llama:
        weight_dtype = resolve_weight_dtype(tree.model.weight_dtype, dtype, batch)
        if weight_dtype not in models:
            config = model.config.replace(weight_dtype=weight_dtype)
            models[weight_dtype] = Llama.from_params(config, Llama.state_params(nnx.state(model)))
        return models[weight_dtype]

    prefills: dict[tuple[int, str], dict[str, float]] = {}  # (context, weights' dtype): each row's own weights

    for context in contexts:
        for batch in batches:
            served = model_for(batch)
            key = (context, served.config.weight_dtype)
            if key not in prefills:
                prefills[key] = prefill_rate(served, context, 1 << max(8, (context + 1).bit_length()), mesh)
            results.append(bench_point(served, tokenizer, batch, context, args, bandwidth, read_gbps, mesh,
                                       prefills[key]))
            if not args.json:
                r = results[-1]
                print(f"batch {batch:4d} context {context:6d}: step {r['step_ms']:9.3f} ms ({r['tokens_per_s']:.1f} "
                      f"tok/s, {r['share_of_floor']:.0%} of the {r['bandwidth_floor_tokens_per_s']:.0f} tok/s that "
                      f"{read_gbps} GB/s allows), roofline {r['roofline_ms']:9.4f} ms (x{r['step_over_roofline']}), "
                      "prefill "
                      f"{r['prefill_tokens_per_s']:.0f} tok/s, compile {r['compile_s']} s, host "
                      f"{r.get('host_overhead_ms', '-')} ms/step", flush=True)
    c = model.config
    report = {
        "benchmark": "engine", "model": name, "preset": args.preset, "layers": c.n_layers, "dtype": dtype,
        "params": c.num_params(), "weight_bytes_per_step": step_weight_bytes(c),
        "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
        "devices": 1 if mesh is None else mesh.size, "hbm_gbps": bandwidth, "bandwidth_source": bandwidth_source,
        "bandwidth_gbps": read_gbps,
        "prefill_batch": args.prefill_batch, "model_init_s": round(init_s, 2), "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results,
        # the measured step times in the form `bench simulate --step-model THIS_FILE` fits (`MeasuredStepTime`)
        "decode": [{"batch": r["batch"], "tokens_in_cache": r["batch"] * r["context"], "seconds": r["step_ms"] / 1e3}
                   for r in results],
        "prefill": [{"tokens": n, "seconds": r["prefill_ms"] / 1e3}
                    for n, r in {r["context"]: r for r in results}.items()],
        "note": "roofline_ms = (weight_bytes + kv_bytes_read) / hbm_gbps; bandwidth_gbps: read bandwidth measured "
                "in this run (fastest 256 MiB sum); bandwidth_floor_tokens_per_s = batch * bandwidth_gbps / "
                "(weight_bytes + kv_bytes_read), the most tokens/s reading them allows; achieved_gbps = (weight_bytes "
                "+ kv_bytes_read) / step; host_overhead_ms = time from a steady step's tokens reaching the host to "
                "the next step's dispatch, through the real orchestrator",
    }
    text = json.dumps(report, indent=2)
    if args.json or not args.out:
        print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return report
