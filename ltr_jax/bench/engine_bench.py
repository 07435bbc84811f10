"""`python -m ltr_jax.bench engine`: decode step time and tokens/s per batch size, against a matmul roofline.

Owns the engine benchmark. For each batch size it fills every decode slot with a sequence of `--context` tokens,
times `--steps` decode steps of the real engine (compiled, cache donated, greedy sampling on device), and in the
same run times the same matrix products alone on the same weights: per layer the Q/K/V/O projections, the SwiGLU
MLP and the attention score and value products over the same context, plus the LM head. Their ratio is
`decode_efficiency` (1.0 = the step costs nothing beyond its matmuls). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.machine import machine_info
from ltr_jax.models.config import PRESETS
from ltr_jax.models.llama import Llama, init_random_params


def _median_time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build_model(source: str | None, dtype: str, seed: int = 0) -> tuple[Llama, str]:
    """`preset:<name>` builds random weights of a published shape (dummy weights); else load real weights."""
    if source and source.startswith("preset:"):
        name = source.split(":", 1)[1]
        if name not in PRESETS:
            raise SystemExit(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        config = PRESETS[name].replace(dtype=dtype)
        return random_model(config, seed), f"{name} (random weights)"
    from ltr_jax.models.loading import load_model

    loaded = load_model(source, dtype=dtype)
    return Llama.from_params(loaded.config, loaded.params), loaded.config.name


def random_model(config, seed: int = 0) -> Llama:
    """Random weights generated on the device (a 16 GB model never passes through host numpy)."""
    if config.num_params() < 5e8:
        return Llama.from_params(config, init_random_params(config, seed))
    from flax import nnx

    return nnx.jit(lambda: Llama(config, nnx.Rngs(seed)))()


def roofline_matmuls(model: Llama, batch: int, context: int):
    """A jitted function doing the decode step's matrix products alone, on the model's own weights."""
    c = model.config
    layers = [(b.wq[...], b.wk[...], b.wv[...], b.wo[...], b.w_gate[...], b.w_up[...], b.w_down[...])
              for b in model.layers]
    head = model.embed[...] if c.tie_embeddings else model.lm_head[...].T
    dt = jnp.dtype(c.dtype)
    x0 = jnp.ones((batch, c.dim), dt) * 0.01
    # one K and one V array per layer, like the real cache: the products must stream the same bytes from memory
    # (a single shared array would stay in the CPU cache across layers and flatter the roofline)
    kv = [(jnp.full((batch * c.n_kv_heads, context, c.head_dim), 0.01 * (i + 1), dt),
           jnp.full((batch * c.n_kv_heads, context, c.head_dim), 0.02 * (i + 1), dt)) for i in range(c.n_layers)]
    q0 = jnp.ones((batch * c.n_kv_heads, c.q_per_kv, c.head_dim), dt) * 0.01

    @jax.jit
    def projections(x, layers, head):
        for wq, wk, wv, wo, wg, wu, wd in layers:
            q, k, v = x @ wq, x @ wk, x @ wv
            x = x + q @ wo + (k.sum() + v.sum()) * 1e-9
            x = x + ((x @ wg) + (x @ wu)) @ wd
        return x @ head.T

    @jax.jit
    def attention(q, kv):
        out = q
        for keys, values in kv:
            s = jnp.einsum("bgd,bsd->bgs", out, keys)  # scores
            out = out + jnp.einsum("bgs,bsd->bgd", s, values) * 1e-3  # probs @ values
        return out

    return (lambda: projections(x0, layers, head)), (lambda: attention(q0, kv))


def bench_batch(model: Llama, batch: int, context: int, steps: int) -> dict[str, Any]:
    max_len = 1 << max(8, (context + steps + 2).bit_length())
    engine = Engine(model, EngineConfig(num_slots=batch, max_seq_len=max_len))
    rng = np.random.default_rng(batch)
    prompt = rng.integers(0, model.config.vocab_size, size=context).tolist()
    prefix = engine.prefill(prompt, SlotSampling())
    for slot in range(batch):
        engine.insert(prefix, slot)
    attend = engine.config.cache_bucket(context + 2 * steps + 2)  # one cache length for the whole timed run
    engine.resize_cache(attend)
    engine.generate().block_until_ready()  # compile
    step_s = _median_time(engine.generate, steps)
    assert engine.cache_len == attend
    proj, attn = roofline_matmuls(model, batch, attend)
    jax.block_until_ready(proj())
    jax.block_until_ready(attn())
    proj_s = _median_time(proj, steps)
    attn_s = _median_time(attn, steps)
    return {
        "batch": batch, "context": context, "attend_len": attend, "step_ms": round(step_s * 1e3, 3),
        "tokens_per_s": round(batch / step_s, 1), "matmul_ms": round(proj_s * 1e3, 3),
        "attention_matmul_ms": round(attn_s * 1e3, 3),
        "decode_efficiency": round((proj_s + attn_s) / step_s, 3),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.bench engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="None = embedded SmolLM2; a .gguf / HF dir; or preset:<name> "
                   f"for random weights of a published shape ({', '.join(PRESETS)})")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--batches", default="1,8,32,64", help="comma-separated batch sizes (decode slots)")
    p.add_argument("--context", type=int, default=128, help="tokens already in each slot's cache")
    p.add_argument("--steps", type=int, default=8, help="timed decode steps per batch size (median reported)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    model, name = build_model(args.model, dtype)
    results = [bench_batch(model, int(b), args.context, args.steps) for b in args.batches.split(",")]
    c = model.config
    param_bytes = c.num_params() * jnp.dtype(dtype).itemsize
    report = {
        "benchmark": "engine", "model": name, "dtype": dtype, "params": c.num_params(),
        "param_bytes": param_bytes, "backend": jax.default_backend(), "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results,
        "note": "decode_efficiency = (projection+head matmuls + attention matmuls, same shapes, alone) / engine step",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return report
