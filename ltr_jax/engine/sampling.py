"""On-device token sampling for a batch of decode slots, each with its own settings.

Owns: greedy / temperature / top-k / top-p sampling inside one compiled function, with per-slot parameter arrays
and per-slot randomness. The key of the token at sequence index `i` of a request is `fold_in(key(seed), i)`, so a
request's tokens depend only on its own seed and context, never on which slot it sits in or what else runs: the
streamed and non-streamed runs, a run alone and a run inside a full batch, and a run before and after an
evict + resume all draw the same tokens.

Cost control: top-k / top-p choose among the `MAX_CANDIDATES` most likely tokens found with `lax.top_k` (a full
vocabulary sort is far slower on CPU; see benchmarks/RESULTS.md), and that path is skipped
with `lax.cond` when no slot asks for it; an all-greedy batch skips the random draw; sampling itself is inverse-CDF
(one uniform per slot) rather than Gumbel noise over the whole vocabulary. Consequence: a nucleus wider than 256
tokens is truncated to the 256 most likely ones.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def slot_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """Per-slot PRNG keys: seeds uint32 [B], positions int32 [B] (sequence index of the token being drawn)."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


MAX_CANDIDATES = 256  # top-k / top-p choose among at most this many most likely tokens per row


def _candidate_mask(sorted_logits: jax.Array, top_k: jax.Array, top_p: jax.Array, log_norm: jax.Array) -> jax.Array:
    """Which of the K best tokens (sorted, descending) each row keeps under its top-k and top-p."""
    ranks = jnp.arange(sorted_logits.shape[-1])[None, :]
    probs = jnp.exp(sorted_logits - log_norm[:, None])  # true probabilities (normalised over the whole vocab)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above this entry
    k = jnp.where(top_k > 0, top_k, sorted_logits.shape[-1])[:, None]
    return (ranks < k) & ((mass_before < top_p[:, None]) | (ranks == 0))


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Logits with everything outside each row's top-k and nucleus set to -inf (reference / tests)."""
    vals, idx = _top_candidates(logits)
    keep = _candidate_mask(vals, top_k, top_p, jax.nn.logsumexp(logits, axis=-1))
    rows = jnp.arange(logits.shape[0])[:, None]
    return jnp.full_like(logits, -jnp.inf).at[rows, idx].set(jnp.where(keep, vals, -jnp.inf))


def _top_candidates(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The MAX_CANDIDATES largest logits per row (descending) and their ids.

    The optimization barrier keeps XLA:CPU from fusing later slices of the values back into the top-k, which it
    otherwise lowers as a full sort."""
    vals, idx = jax.lax.top_k(logits, min(MAX_CANDIDATES, logits.shape[-1]))
    return jax.lax.optimization_barrier(vals), idx


def _inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """Index drawn from each row of (unnormalised) probs with uniforms u in [0, 1)."""
    cdf = jnp.cumsum(probs, axis=-1)
    idx = jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(cdf, u * cdf[:, -1])
    return jnp.minimum(idx, probs.shape[-1] - 1)


def sample_tokens(
    logits: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    seeds: jax.Array,
    positions: jax.Array,
) -> jax.Array:
    """Draw one token per row. temperature <= 0 means greedy. Returns int32 [B]."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw() -> jax.Array:
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(slot_keys(seeds, positions))
        filtered = (top_k > 0) | (top_p < 1.0)

        def full_vocab() -> jax.Array:
            return _inverse_cdf(jax.nn.softmax(scaled, axis=-1), u)

        def with_filter() -> jax.Array:  # rows without a filter still draw from the whole vocabulary
            vals, idx = _top_candidates(scaled)
            keep = _candidate_mask(vals, top_k, top_p, jax.nn.logsumexp(scaled, axis=-1))
            probs = jnp.where(keep, jnp.exp(vals - vals[:, :1]), 0.0)
            pick = jnp.take_along_axis(idx, _inverse_cdf(probs, u)[:, None], axis=-1)[:, 0]
            return jax.lax.cond(jnp.all(filtered), lambda: pick, lambda: jnp.where(filtered, pick, full_vocab()))

        return jax.lax.cond(jnp.any(filtered), with_filter, full_vocab).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
    return jnp.where(temperature > 0, sampled, greedy)
