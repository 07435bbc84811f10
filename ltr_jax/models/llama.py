"""The Llama-3 family as a Flax NNX module, with an explicit, donatable KV cache.

Owns: RMSNorm, rotary embeddings (plain and Llama-3.1 "llama3" scaled), grouped-query attention, the SwiGLU MLP,
optional tied embeddings, and the forward passes the rest of the stack needs:

* `Block.prompt_pass` - one block over a prompt pass's padded rows, causal attention, returning the rows' K/V;
                     a pass can continue a cached shared prefix (``past``: its K/V), so a prompt that starts with
                     the chat template's fixed header runs only the tokens after it. The serving path runs it one
                     compiled block per call (`ltr_jax.models.blockwise`); `Llama.run_blocks` unrolls it in one
                     graph (training features, tests, the reference);
* `Llama.decode`   - one new token for each of B decode slots, reading and writing a per-layer KV cache
                     in place (one scatter of B x kv_heads rows; the cache buffers are donated by the engine, so
                     no step copies the cache), all blocks in one compiled step;
* `Llama.decode_with_pass` - the same step, carrying one prompt's pass through the first blocks;
* `reference_forward` / `hidden_states` - plain full-sequence passes for tests and training features.

Decode KV cache layout: a list with one `(k, v)` pair per layer, k `[slots, kv_heads, head_dim, cache_len]` and v
`[slots, kv_heads, cache_len, head_dim]`: each is the layout its product in decode attention wants (scores = q . k
runs along the cache, the output = probs . v along head_dim), so XLA streams both with no transposing copy (keys
stored like values make the score product markedly slower on a CPU; benchmarks/RESULTS.md). Prompt passes
(prefill, `past`, `run_blocks`) keep their K/V as `[B, kv_heads, T, head_dim]`; the engine transposes keys when it
inserts a prefix into a slot. Decode attends over the whole cache with a per-slot length mask, reading it in
place. The engine keeps `cache_len` at a bucket just above the longest running sequence, growing or shrinking the
buffers between steps, so a step's cost follows the real context length rather than the model's maximum.

Sharding is declared here, once, beside each weight: every `nnx.Param` carries its logical axes (metadata
``logical_axes``, e.g. ``("q_heads", "embed")`` for wo) and `KV_CACHE_AXES` / `K_CACHE_AXES` name the decode
cache's; the engine's mesh (`ltr_jax.engine.sharding`) maps logical axes to mesh axes.

Weights enter as a plain params dict of arrays (see `ltr_jax.models.loading`) with (in, out) matrices and Q/K in
Hugging Face rotate-half order, each projection separate; `from_params` fuses each layer's Q, K, V into one matrix
and gate and up into another (`fuse_layer`), so a decode step reads each layer in four matmuls instead of seven
(on a CPU at batch 1, matmuls this size stream their weights at a higher rate).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ltr_jax.models.config import LlamaConfig

KVCache = list  # list[tuple[jax.Array, jax.Array]]: per layer (k, v); decode: k [slots, kv_heads, head_dim, cache_len],
# v [slots, kv_heads, cache_len, head_dim]; prompt passes: both [B, kv_heads, T, head_dim]

_LAYER_KEYS = ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate", "w_up", "w_down")  # the loaders' layout
_FUSED_LAYER_KEYS = ("attn_norm", "wqkv", "wo", "mlp_norm", "w_gate_up", "w_down")  # the module's (`fuse_layer`)

AXES = "logical_axes"  # the nnx.Param metadata key holding a weight's logical axes (one name, or None, per dim)
# Logical axis names: "vocab", "embed" (model width), "q_heads" / "kv_heads" (a projection's heads x head_dim),
# "ffn" (MLP width), "slots", "seq", "head_dim".
LOGICAL_AXES = ("vocab", "embed", "q_heads", "kv_heads", "ffn", "slots", "seq", "head_dim")
KV_CACHE_AXES = ("slots", "kv_heads", "seq", "head_dim")  # each layer's decode v [slots, kv_heads, cache_len, hd]
K_CACHE_AXES = ("slots", "kv_heads", "head_dim", "seq")  # each layer's decode k [slots, kv_heads, hd, cache_len]


def _param(value: jax.Array, *axes: str | None) -> nnx.Param:
    """A weight with its logical axes (how a mesh may split it)."""
    return nnx.Param(value, **{AXES: axes})


def _as_dtype(a, dt: jnp.dtype) -> jax.Array:
    """``a`` as a device array of ``dt``. Host arrays are converted on the host (numpy knows bfloat16 through
    ml_dtypes), so loading compiles no conversion kernels (every compiled executable stays resident); a device
    array of the right dtype is kept as it is (no copy)."""
    if isinstance(a, jax.Array):
        return a if a.dtype == dt else a.astype(dt)
    return jax.device_put(np.asarray(a).astype(dt, copy=False))


def dtype_of(config: LlamaConfig) -> jnp.dtype:
    """The activations' (and KV cache's) dtype."""
    return jnp.dtype(config.dtype)


def _matmul(spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``einsum(spec, x, w)`` with x rounded to the weight's dtype and the product in x's dtype (the same as a
    plain product when the two agree; see `LlamaConfig.param_dtype`)."""
    return jnp.einsum(spec, x.astype(w.dtype), w, preferred_element_type=x.dtype)


# ----------------------------------------------------------------------------------------------- rotary embedding
def rope_frequencies(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies [head_dim // 2], with Llama-3.1 "llama3" scaling when configured."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd))
    rs = config.rope_scaling
    if rs is not None:
        low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / rs.factor + smooth * inv_freq, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """x: [B, T, H, hd]; positions: [B, T]. Rotate-half convention (Hugging Face order)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, hd/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32)).astype(x.dtype)


# ------------------------------------------------------------------------------------------------------- modules
class Block(nnx.Module):
    """One decoder layer: pre-norm GQA attention + pre-norm SwiGLU MLP, residual around each."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        c, dt = config, jnp.dtype(config.param_dtype)
        init = nnx.initializers.normal(0.02)
        hd = c.head_dim
        self.config = c
        self.attn_norm = _param(jnp.ones((c.dim,), dt), "embed")
        # Q, K and V of each KV head's group side by side (see `fuse_layer`), so one matmul reads them all, and a
        # mesh splitting KV heads gives each device whole groups
        self.wqkv = _param(init(rngs.params(), (c.dim, c.n_kv_heads, (c.q_per_kv + 2) * hd), dt),
                           "embed", "kv_heads", None)
        self.wo = _param(init(rngs.params(), (c.n_heads * hd, c.dim), dt), "q_heads", "embed")
        self.mlp_norm = _param(jnp.ones((c.dim,), dt), "embed")
        self.w_gate_up = _param(init(rngs.params(), (c.dim, 2, c.ffn_dim), dt), "embed", None, "ffn")
        self.w_down = _param(init(rngs.params(), (c.ffn_dim, c.dim), dt), "ffn", "embed")

    def qkv(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array):
        c = self.config
        b, t, _ = x.shape
        h = rms_norm(x, self.attn_norm[...], c.norm_eps)
        qkv = _matmul("btd,dkf->btkf", h, self.wqkv[...]).reshape(b, t, c.n_kv_heads, c.q_per_kv + 2, c.head_dim)
        q = qkv[:, :, :, : c.q_per_kv].reshape(b, t, c.n_heads, c.head_dim)
        k, v = qkv[:, :, :, c.q_per_kv], qkv[:, :, :, c.q_per_kv + 1]
        return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def attend_one(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """Decode attention, one query per slot. q [B, H, hd]; k [B, KV, hd, S], v [B, KV, S, hd] (the decode
        cache's layout); mask [B, S] (the positions it may attend to). -> [B, H*hd]."""
        c = self.config
        b = q.shape[0]
        qg = q.reshape(b, c.n_kv_heads, c.q_per_kv, c.head_dim)
        scores = jnp.einsum("bkgd,bkds->bkgs", qg, k, preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, None, None, :], scores * (1.0 / math.sqrt(c.head_dim)), -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgs,bksd->bkgd", probs, v, preferred_element_type=jnp.float32)
        return out.reshape(b, c.n_heads * c.head_dim).astype(q.dtype)

    def mlp(self, x: jax.Array) -> jax.Array:
        h = rms_norm(x, self.mlp_norm[...], self.config.norm_eps)
        gate_up = _matmul("...d,dcf->...cf", h, self.w_gate_up[...])
        return _matmul("...f,fd->...d", jax.nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :], self.w_down[...])

    def out_proj(self, attn: jax.Array) -> jax.Array:
        return _matmul("...i,id->...d", attn, self.wo[...])

    def prompt_pass(self, x: jax.Array, positions: jax.Array, inv_freq: jax.Array, mask: jax.Array, past_kv=None):
        """This block over a prompt pass's residual stream x [B, T, D] at ``positions`` [B, T], attention ``mask``
        [B, T, P + T] (`prompt_mask`), after a cached prefix's (k, v) [1 or B, KV, P, hd] (None: none). Returns
        (x after the block, this pass's own k, v [B, KV, T, hd])."""
        q, k, v = self.qkv(x, positions, inv_freq)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        x = x + self.out_proj(self.attend(q, *_after_past(past_kv, k, v), mask))
        return x + self.mlp(x), k, v

    def attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
        """q [B, T, H, hd]; k, v [B, KV, S, hd]; mask [B, T, S] (True = may attend). Returns [B, T, H*hd]."""
        c = self.config
        b, t = q.shape[:2]
        qg = q.reshape(b, t, c.n_kv_heads, c.q_per_kv, c.head_dim)
        scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32)
        scores = scores * (1.0 / math.sqrt(c.head_dim))
        scores = jnp.where(mask[:, None, None, :, :], scores, -1e30)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        # the output is rounded to the model dtype anyway: the matmul accumulates in float32 on accelerators
        # (asking XLA:CPU for a bf16 x bf16 = f32 product here fails for several rows after a cached prefix)
        out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
        return out.reshape(b, t, c.n_heads * c.head_dim).astype(q.dtype)


class Llama(nnx.Module):
    """A Llama-family decoder. Build with `Llama(config, rngs)` (random) or `Llama.from_params(config, params)`."""

    def __init__(self, config: LlamaConfig, rngs: nnx.Rngs):
        c, dt = config, jnp.dtype(config.param_dtype)
        self.config = c
        self.embed = _param(nnx.initializers.normal(0.02)(rngs.params(), (c.vocab_size, c.dim), dt), "vocab", "embed")
        self.layers = nnx.List([Block(c, rngs) for _ in range(c.n_layers)])
        self.final_norm = _param(jnp.ones((c.dim,), dt), "embed")
        if not c.tie_embeddings:
            self.lm_head = _param(nnx.initializers.normal(0.02)(rngs.params(), (c.dim, c.vocab_size), dt),
                                  "embed", "vocab")
        self.inv_freq = nnx.Variable(jnp.asarray(rope_frequencies(c)))

    # -------------------------------------------------------------------------------------------- construction
    @classmethod
    def from_params(cls, config: LlamaConfig, params: dict[str, Any]) -> Llama:
        """Build the module from a params dict (numpy or jax arrays; layers in the loaders' layout or the module's,
        see `fuse_layer`), checking every shape."""
        check_params(config, params)
        abstract = nnx.eval_shape(lambda: cls(config, nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract)
        dt = jnp.dtype(config.param_dtype)
        tree = {
            "embed": params["embed"],
            "final_norm": params["final_norm"],
            "layers": {i: fuse_layer(config, layer) for i, layer in enumerate(params["layers"])},
        }
        if not config.tie_embeddings:
            tree["lm_head"] = params["lm_head"]
        tree = jax.tree.map(lambda a: _as_dtype(a, dt), tree)
        tree["inv_freq"] = jax.device_put(rope_frequencies(config))
        nnx.replace_by_pure_dict(state, tree)
        return nnx.merge(graphdef, state)

    @staticmethod
    def state_params(state) -> dict[str, Any]:
        """A model state's weights (`nnx.split`'s state, e.g. `Engine.params`) as a params dict (layers in the
        module's fused layout, which `from_params` takes too), as the same device arrays (no copy): a ranker built
        from it shares the served model's memory."""
        pure = nnx.to_pure_dict(state)
        out = {k: v for k, v in pure.items() if k not in ("layers", "inv_freq")}
        out["layers"] = [pure["layers"][i] for i in sorted(pure["layers"])]
        return out

    def to_params(self) -> dict[str, Any]:
        """The inverse of `from_params`: a params dict of numpy arrays in the loaders' layout."""
        layers = [split_layer(self.config, {k: np.asarray(getattr(blk, k)[...]) for k in _FUSED_LAYER_KEYS})
                  for blk in self.layers]
        out: dict[str, Any] = {"embed": np.asarray(self.embed[...]), "final_norm": np.asarray(self.final_norm[...]),
                               "layers": layers}
        if not self.config.tie_embeddings:
            out["lm_head"] = np.asarray(self.lm_head[...])
        return out

    # ---------------------------------------------------------------------------------------------- pieces
    def logits(self, x: jax.Array) -> jax.Array:
        x = rms_norm(x, self.final_norm[...], self.config.norm_eps)
        if self.config.tie_embeddings:  # contract the table's own minor axis: a transposed view would be copied
            return jnp.einsum("...d,vd->...v", x.astype(self.embed[...].dtype), self.embed[...],
                              preferred_element_type=jnp.float32)
        return jnp.einsum("...d,dv->...v", x.astype(self.lm_head[...].dtype), self.lm_head[...],
                          preferred_element_type=jnp.float32)

    def _embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], tokens, axis=0).astype(dtype_of(self.config))

    # ---------------------------------------------------------------------------------------------- passes
    def hidden(self, tokens: jax.Array, lengths: jax.Array, n_layers: int | None = None, past: KVCache | None = None):
        """Causal pass over [B, T] right-padded tokens; returns (hidden [B, T, D], per-layer (k, v) [B, KV, T, hd]).
        With ``past`` the tokens continue a shared prefix (see `run_blocks`)."""
        return self.run_blocks(self._embed(tokens), lengths, 0, n_layers, past)

    def run_blocks(self, x: jax.Array, lengths: jax.Array, start: int = 0, stop: int | None = None,
                   past: KVCache | None = None):
        """Blocks ``start .. stop-1`` over the residual stream x [B, T, D] of right-padded sequences of ``lengths``.

        ``past``: the (k, v) [1 or B, KV, P, hd] of a P-token prefix every row continues, one pair per block run
        (a cached shared prefix): the rows then sit at positions P.. and attend to all P prefix keys first.

        Returns (x after the last of them, their own (k, v) [B, KV, T, hd] per block, without the prefix's). A
        pass split in two (blocks up to n, then from n), or split after a prefix, computes
        exactly what one full pass does."""
        b, t, _ = x.shape
        blocks = list(self.layers)[start:stop]
        p = past_len(past)
        if past and len(past) != len(blocks):
            raise ValueError(f"past holds K/V for {len(past)} blocks but {len(blocks)} blocks run")
        positions, mask = prompt_positions(b, t, p), prompt_mask(lengths, t, p)
        kvs = []
        for i, blk in enumerate(blocks):
            x, k, v = blk.prompt_pass(x, positions, self.inv_freq[...], mask, past[i] if p else None)
            kvs.append((k, v))
        return x, kvs

    def decode(self, tokens: jax.Array, positions: jax.Array, cache: KVCache):
        """One token per slot. tokens, positions: [B]. Writes K/V at `positions`, attends over positions <= own.

        Returns (logits [B, V], cache). The cache is updated with a row scatter per layer; when the caller donates
        it (the engine does) XLA updates the buffers in place.
        """
        logits, cache, _, _ = self.decode_with_pass(tokens, positions, cache)
        return logits, cache

    def decode_with_pass(self, tokens: jax.Array, positions: jax.Array, cache: KVCache, pass_tokens=None,
                         pass_length=None, n_pass: int = 0, past: KVCache | None = None):
        """`decode`, plus one prompt's pass through the first ``n_pass`` blocks in the same layer loop.

        pass_tokens [1, T] right-padded, pass_length [1]; ``past``: the cached prefix the prompt continues (K/V of
        those blocks, see `run_blocks`). In each of those blocks the prompt's rows join the slots' rows in one set
        of matmuls, so the block's weights are read once for both: where a decode step is bound by reading the
        weights (a CPU, or a GPU at small batch), the pass then costs little beyond its own arithmetic.

        Returns (logits [B, V], cache, the pass's hidden state [1, T, D] after block n_pass, its (k, v)
        [1, KV, T, hd] per block); without a pass the last two are None and []."""
        b = tokens.shape[0]
        x = self._embed(tokens)[:, None, :]
        cache_len = cache[0][1].shape[2]
        mask = jnp.arange(cache_len)[None, :] <= positions[:, None]  # [B, S]
        xp, pass_kvs = None, []
        if pass_tokens is not None:
            t, p = pass_tokens.shape[1], past_len(past)
            xp = self._embed(pass_tokens)
            pass_mask = prompt_mask(pass_length, t, p)
            joint_positions = jnp.concatenate([positions, p + jnp.arange(t, dtype=positions.dtype)])[None]
        new_cache = []
        for i, (blk, (kc, vc)) in enumerate(zip(self.layers, cache)):
            joint = xp is not None and i < n_pass
            if joint:  # [1, B + T, ...]: the slots' rows, then the prompt's
                h = jnp.concatenate([x[:, 0], xp[0]])[None]
                q, k, v = blk.qkv(h, joint_positions, self.inv_freq[...])
                qd, kd, vd = q[0, :b, None], k[0, :b, None], v[0, :b, None]
            else:
                qd, kd, vd = blk.qkv(x, positions[:, None], self.inv_freq[...])
            kc, vc = _write_rows(kc, kd[:, 0], positions, keys=True), _write_rows(vc, vd[:, 0], positions)
            attn = blk.attend_one(qd[:, 0], kc, vc, mask)
            if joint:
                kp, vp = k[:, b:].transpose(0, 2, 1, 3), v[:, b:].transpose(0, 2, 1, 3)
                prompt_attn = blk.attend(q[:, b:], *_after_past(past[i] if past else None, kp, vp), pass_mask)
                h = h + blk.out_proj(jnp.concatenate([attn, prompt_attn[0]])[None])
                h = h + blk.mlp(h)
                x, xp = h[0, :b, None], h[:, b:]
                pass_kvs.append((kp, vp))
            else:
                x = x + blk.out_proj(attn)[:, None, :]
                x = x + blk.mlp(x)
            new_cache.append((kc, vc))
        return self.logits(x[:, 0]), new_cache, xp, pass_kvs


def _write_rows(cache: jax.Array, rows: jax.Array, at: jax.Array, keys: bool = False) -> jax.Array:
    """A decode cache with each slot's new key or value [B, KV, hd] written at its position ``at`` [B]: v
    [B, KV, S, hd], or with ``keys`` k [B, KV, hd, S].

    One scatter of B x KV rows into the cache viewed as [B * KV, ...], which XLA:CPU does in place when the step
    donates the cache. (Written per slot, one slot's write is a single row, which XLA turns into a
    dynamic-update-slice and fuses into each reader of the cache, each on its own copy of it.) A position past the
    cache's end is clamped to its last row: only a free slot has one (the engine grows the cache before a running
    sequence reaches its end), and a clamped write, unlike a dropped one, needs no read of the old row."""
    b, kv = cache.shape[:2]
    flat = cache.reshape(b * kv, *cache.shape[2:])
    index = (jnp.arange(b * kv), slice(None), jnp.repeat(at, kv)) if keys else (jnp.arange(b * kv), jnp.repeat(at, kv))
    flat = flat.at[index].set(rows.reshape(b * kv, -1).astype(cache.dtype), mode="clip")
    return flat.reshape(cache.shape)


def past_len(past: KVCache | None) -> int:
    return past[0][0].shape[2] if past else 0


def prompt_positions(b: int, t: int, p: int) -> jax.Array:
    """[B, T] positions of prompt rows after a P-token cached prefix."""
    return jnp.broadcast_to(p + jnp.arange(t, dtype=jnp.int32), (b, t))


def prompt_mask(lengths: jax.Array, t: int, p: int) -> jax.Array:
    """[B, T, P + T] attention mask of right-padded rows of ``lengths`` after a P-token cached prefix: causal among
    the rows, keys past a row's length are padding, every prefix key is real and precedes every row."""
    causal = jnp.tril(jnp.ones((t, t), bool))
    valid = jnp.arange(t)[None, :] < lengths[:, None]
    mask = causal[None] & valid[:, None, :]
    if p:
        mask = jnp.concatenate([jnp.ones((lengths.shape[0], t, p), bool), mask], axis=2)
    return mask


def _after_past(past_kv, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys and values [B, KV, P + T, hd]: a cached prefix's (k, v) [1 or B, KV, P, hd] (None: none), then k, v."""
    if past_kv is None:
        return k, v
    b = k.shape[0]
    pk, pv = (jnp.broadcast_to(a, (b, *a.shape[1:])).astype(k.dtype) for a in past_kv)
    return jnp.concatenate([pk, k], axis=2), jnp.concatenate([pv, v], axis=2)


# ------------------------------------------------------------------------------------------- params utilities
def fuse_layer(config: LlamaConfig, layer: dict[str, Any]) -> dict[str, Any]:
    """One layer's weights in the module's layout: ``wqkv`` [dim, kv_heads, (q_per_kv + 2) * head_dim] holds, for
    each KV head, the query heads that share it (Hugging Face order: query head h uses KV head h // q_per_kv), then
    its key and its value; ``w_gate_up`` [dim, 2, ffn_dim] is the gate and up projections. A layer already in this
    layout is returned as is (the same arrays); numpy in, numpy out."""
    if "wqkv" in layer:
        return {k: layer[k] for k in _FUSED_LAYER_KEYS}
    c = config
    xp = np if all(isinstance(layer[k], np.ndarray) for k in ("wq", "wk", "wv", "w_gate", "w_up")) else jnp
    d, kv, hd = layer["wq"].shape[0], c.n_kv_heads, c.head_dim
    wqkv = xp.concatenate([layer["wq"].reshape(d, kv, c.q_per_kv * hd), layer["wk"].reshape(d, kv, hd),
                           layer["wv"].reshape(d, kv, hd)], axis=2)
    out = {k: layer[k] for k in ("attn_norm", "wo", "mlp_norm", "w_down")}
    return {**out, "wqkv": wqkv, "w_gate_up": xp.stack([layer["w_gate"], layer["w_up"]], axis=1)}


def split_layer(config: LlamaConfig, layer: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `fuse_layer`: the loaders' separate wq, wk, wv, w_gate, w_up."""
    c = config
    wqkv = layer["wqkv"]
    d, g = wqkv.shape[0], c.q_per_kv * c.head_dim
    out = {k: layer[k] for k in ("attn_norm", "wo", "mlp_norm", "w_down")}
    return {**out, "wq": wqkv[:, :, :g].reshape(d, -1), "wk": wqkv[:, :, g: g + c.head_dim].reshape(d, -1),
            "wv": wqkv[:, :, g + c.head_dim:].reshape(d, -1), "w_gate": layer["w_gate_up"][:, 0],
            "w_up": layer["w_gate_up"][:, 1]}


def fused_layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    c = config
    return {"attn_norm": (c.dim,), "wqkv": (c.dim, c.n_kv_heads, (c.q_per_kv + 2) * c.head_dim),
            "wo": (c.n_heads * c.head_dim, c.dim), "mlp_norm": (c.dim,), "w_gate_up": (c.dim, 2, c.ffn_dim),
            "w_down": (c.ffn_dim, c.dim)}


def param_shapes(config: LlamaConfig) -> dict[str, Any]:
    c, hd = config, config.head_dim
    layer = {
        "attn_norm": (c.dim,), "wq": (c.dim, c.n_heads * hd), "wk": (c.dim, c.n_kv_heads * hd),
        "wv": (c.dim, c.n_kv_heads * hd), "wo": (c.n_heads * hd, c.dim), "mlp_norm": (c.dim,),
        "w_gate": (c.dim, c.ffn_dim), "w_up": (c.dim, c.ffn_dim), "w_down": (c.ffn_dim, c.dim),
    }
    shapes: dict[str, Any] = {"embed": (c.vocab_size, c.dim), "final_norm": (c.dim,),
                              "layers": [dict(layer) for _ in range(c.n_layers)]}
    if not c.tie_embeddings:
        shapes["lm_head"] = (c.dim, c.vocab_size)
    return shapes


def check_params(config: LlamaConfig, params: dict[str, Any]) -> None:
    """Raise ValueError naming every missing or mis-shaped tensor."""
    expected = param_shapes(config)
    problems = []
    for key in ("embed", "final_norm", "lm_head"):
        if key not in expected:
            continue
        if key not in params:
            problems.append(f"missing tensor {key!r}")
        elif tuple(params[key].shape) != expected[key]:
            problems.append(f"{key}: shape {tuple(params[key].shape)}, expected {expected[key]}")
    layers = params.get("layers")
    if not isinstance(layers, (list, tuple)) or len(layers) != config.n_layers:
        problems.append(f"expected {config.n_layers} layers, got {len(layers) if layers is not None else 'none'}")
    else:
        fused = fused_layer_shapes(config)
        for i, (layer, shapes) in enumerate(zip(layers, expected["layers"])):
            for key, shape in (fused if "wqkv" in layer else shapes).items():
                if key not in layer:
                    problems.append(f"layers.{i}.{key} missing")
                elif tuple(layer[key].shape) != shape:
                    problems.append(f"layers.{i}.{key}: shape {tuple(layer[key].shape)}, expected {shape}")
    if problems:
        raise ValueError(f"params do not match the {config.name} config: " + "; ".join(problems[:10]))


def init_random_params(config: LlamaConfig, seed: int = 0, scale: float = 0.02) -> dict[str, Any]:
    """Random float32 numpy params in the loader format (norm weights near 1). For tests and dummy-weight runs."""
    rng = np.random.default_rng(seed)
    shapes = param_shapes(config)

    def make(name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name.endswith("norm"):
            return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    out: dict[str, Any] = {k: make(k, v) for k, v in shapes.items() if k != "layers"}
    out["layers"] = [{k: make(k, s) for k, s in layer.items()} for layer in shapes["layers"]]
    return out


def reference_forward(config: LlamaConfig, params: dict[str, Any], tokens) -> jax.Array:
    """Full causal forward, no cache: logits [B, T, V] in float32. For tests and reference checks."""
    model = Llama.from_params(config, params)
    tokens = jnp.asarray(tokens, jnp.int32)
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    x, _ = model.hidden(tokens, lengths)
    return model.logits(x)


class BackboneState(NamedTuple):
    """One prompt's pass through the backbone blocks, kept on the device: the first part of its prefill."""

    hidden: jax.Array  # [T, D]: the residual stream after block n_layers (positions >= length are padding)
    kv: jax.Array  # [n_layers, 2, kv_heads, T, head_dim]: each backbone block's keys and values
    length: int  # real tokens in this state (T is the padded length)
    prefix_len: int = 0  # tokens of the shared prefix before them (their K/V are cached by the engine and ranker)

    @property
    def n_layers(self) -> int:
        return int(self.kv.shape[0])

    @property
    def nbytes(self) -> int:
        return int(self.hidden.nbytes + self.kv.nbytes)


def hidden_states(config: LlamaConfig, params: dict[str, Any], tokens, lengths, n_layers: int,
                  with_kv: bool = False, past: KVCache | None = None):
    """Output of the first `n_layers` blocks, [B, T, D] (ranker backbone). Padded positions are garbage.

    With ``with_kv``: (hidden, those blocks' (k, v) [B, KV, T, hd] each), the first part of a prefill. With
    ``past``: the tokens continue a cached prefix (`Llama.run_blocks`)."""
    model = Llama.from_params(config, params)
    x, kvs = model.hidden(jnp.asarray(tokens, jnp.int32), jnp.asarray(lengths, jnp.int32), n_layers, past)
    return (x, kvs) if with_kv else x
