"""On-device token sampling for a batch of decode slots, each with its own settings.

Owns: greedy / temperature / top-k / top-p sampling inside one compiled function, with per-slot parameter arrays
and per-slot randomness. The key of the token at sequence index `i` of a request is `fold_in(key(seed), i)`, so a
request's tokens depend only on its own seed and context, never on which slot it sits in or what else runs: the
streamed and non-streamed runs, a run alone and a run inside a full batch, and a run before and after an
evict + resume all draw the same tokens.

Cost control: the sort that top-k / top-p need is skipped with `lax.cond` when no slot asks for it, and an
all-greedy batch skips the random draw; sampling itself is inverse-CDF (one uniform per slot) rather than
Gumbel noise over the whole vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def slot_keys(seeds: jax.Array, positions: jax.Array) -> jax.Array:
    """Per-slot PRNG keys: seeds uint32 [B], positions int32 [B] (sequence index of the token being drawn)."""
    return jax.vmap(lambda s, p: jax.random.fold_in(jax.random.key(s), p))(seeds, positions)


def _filter_top_k_top_p(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Set logits outside each row's top-k and nucleus (top-p) to -inf. logits [B, V] float32 (temperature-scaled)."""
    vocab = logits.shape[-1]
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    ranks = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, top_k, vocab)[:, None]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above this entry
    keep_sorted = (ranks < k) & ((mass_before < top_p[:, None]) | (ranks == 0))
    keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    return jnp.where(keep, logits, -jnp.inf)


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
        needs_filter = jnp.any((top_k > 0) | (top_p < 1.0))
        scaled = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda x, *_: x, scaled, top_k, top_p)
        probs = jax.nn.softmax(scaled, axis=-1)
        cdf = jnp.cumsum(probs, axis=-1)
        u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(slot_keys(seeds, positions))
        u = u * cdf[:, -1]
        idx = jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(cdf, u)
        return jnp.minimum(idx, logits.shape[-1] - 1).astype(jnp.int32)

    sampled = jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)
    return jnp.where(temperature > 0, sampled, greedy)
