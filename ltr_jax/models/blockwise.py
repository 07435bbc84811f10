"""Prompt passes run one compiled block per call.

Owns how the serving path runs a prompt through the model's blocks: the engine's prefills (single, batched, the
shared prefix, the rest of a prefill after the ranker's pass) and the ranker's pass over its backbone blocks. Each
is a Python loop over the blocks calling one jitted function of one block's weights and the residual stream
(`run_blocks`), with small jitted pieces before it (`embed`) and after it (the callers' own: logits and sampling,
pooling and the ranker's head). So one compiled block serves every layer of a pass and every pass of the same
prompt shape (rows, padded length, cached-prefix length, dtypes): the ranker's pass over the first blocks and the
prefill that continues it share it, as do the chat header's prefill and the ranker's pass over that header.

Why: on XLA:CPU every compiled executable keeps memory resident in proportion to the code it unrolls, so a pass
compiled whole holds one copy of that cost per block per prompt shape, and the ranker's pass and the prefill that
continues it each held their own (benchmarks/RESULTS.md measures both). A prompt pass is bound by arithmetic, so a
dispatch per block costs little of it. The decode step stays one unrolled executable (`Llama.decode`): it is short
and runs every token, so a dispatch per block would be a visible share of it.

Each block computes `Block.prompt_pass`, the code `Llama.run_blocks` unrolls, so the two agree to rounding. The
compiled block's static key is the model config with one layer (`block_config`), so passes over the same weights
from models of different depth (the served model and the ranker's backbone of its first blocks) share it.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ltr_jax.models.config import LlamaConfig
from ltr_jax.models.llama import Block, KVCache, past_len, prompt_mask, prompt_positions, rope_frequencies


def block_config(config: LlamaConfig) -> LlamaConfig:
    """The static key of a compiled block: ``config`` with its depth set to one block."""
    return config if config.n_layers == 1 else config.replace(n_layers=1)


@functools.partial(jax.jit, static_argnames=("config",))
def _block(config: LlamaConfig, layer: dict[str, Any], inv_freq, x, lengths, past_kv):
    """One block (weights ``layer``, the module's fused layout) over x [B, T, D] of right-padded rows of
    ``lengths``, after the cached prefix (k, v) ``past_kv`` (None: none). Returns (x, k, v [B, KV, T, hd])."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Block(config, nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, layer)
    blk = nnx.merge(graphdef, state)
    b, t, _ = x.shape
    p = past_kv[0].shape[2] if past_kv is not None else 0
    return blk.prompt_pass(x, prompt_positions(b, t, p), inv_freq, prompt_mask(lengths, t, p), past_kv)


@functools.partial(jax.jit, static_argnames=("dtype",))
def _embed(dtype: str, table, tokens):
    return jnp.take(table, tokens, axis=0).astype(dtype)


JITTED = (_block, _embed)


def inv_freq_for(config: LlamaConfig, device=None) -> jax.Array:
    """The rotary inverse frequencies as a device array (committed to ``device``, default the first), as
    `Llama.from_params` keeps them."""
    return jax.device_put(rope_frequencies(config), device or jax.devices()[0])


def embed(config: LlamaConfig, table: jax.Array, tokens) -> jax.Array:
    """Token ids [B, T] -> the residual stream [B, T, D] in the activations' dtype."""
    return _embed(str(jnp.dtype(config.dtype)), table, np.asarray(tokens, np.int32))


def run_blocks(config: LlamaConfig, layers: list[dict[str, Any]], inv_freq: jax.Array, x: jax.Array, lengths,
               past: KVCache | None = None) -> tuple[jax.Array, KVCache]:
    """``layers`` (one weights dict per block, in order) over x [B, T, D], one compiled block per call; ``past``:
    a cached prefix's (k, v) per block run, as in `Llama.run_blocks`. Returns (x after the last block, each block's
    own (k, v) [B, KV, T, hd])."""
    if past and len(past) != len(layers):
        raise ValueError(f"past holds K/V for {len(past)} blocks but {len(layers)} blocks run")
    key = block_config(config)
    lengths = np.asarray(lengths, np.int32) if not isinstance(lengths, jax.Array) else lengths
    kvs = []
    for i, layer in enumerate(layers):
        x, k, v = _block(key, layer, inv_freq, x, lengths, tuple(past[i]) if past_len(past) else None)
        kvs.append((k, v))
    return x, kvs
