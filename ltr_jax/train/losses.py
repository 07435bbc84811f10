"""Training losses for the length ranker: ListMLE, log-length regression and bucket classification.

Sign convention everywhere in ltr_jax: a HIGHER score means a SHORTER expected output (that request runs first).
Each loss pairs with a rule that turns the head's raw output into such a score
(`ltr_jax.models.ranker.scores_from_outputs`, shared with serving):

- ``listmle``: the head output IS the score; the true order is shortest output first.
- ``regression``: the head predicts the standardised log output length; score = -prediction.
- ``classify``: the head gives one logit per length bucket (bucket 0 = shortest); score = -expected bucket.

All losses take a ``mask`` so padded entries of a ragged list or batch contribute nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_BUCKETS = 10

# A finite stand-in for -inf: keeps logsumexp and its gradient free of NaNs on fully padded tails.
_MASKED_SCORE = -1e30


def reverse_cumulative_logsumexp(x: jax.Array) -> jax.Array:
    """out[..., i] = logsumexp(x[..., i:]) along the last axis, exactly (no underflow for spread-out scores).

    Computed as a masked logsumexp over an upper-triangular [n, n] mask: O(n^2) per list, which for list sizes
    of tens is cheap and compiles far faster on CPU than `jax.lax.cumlogsumexp`'s associative scan.
    """
    n = x.shape[-1]
    upper = jnp.triu(jnp.ones((n, n), bool))  # upper[i, j] = j >= i
    return jax.nn.logsumexp(jnp.where(upper, x[..., None, :], _MASKED_SCORE), axis=-1)


def listmle_loss(scores: jax.Array, lengths: jax.Array, mask: jax.Array, key: jax.Array) -> jax.Array:
    """ListMLE (Plackett-Luce negative log-likelihood of the shortest-first order), mean over lists.

    scores, lengths, mask: [num_lists, list_size]. Entries with equal lengths are ordered by a random shuffle
    drawn from ``key`` (one independent shuffle per list) before a stable sort by length, so ties are broken
    uniformly at random. For each list: loss = sum_i [logsumexp(s_(i), ..., s_(n)) - s_(i)] over the valid
    entries in true order.
    """
    scores = jnp.asarray(scores, jnp.float32)
    lengths = jnp.asarray(lengths, jnp.float32)
    mask = jnp.asarray(mask, bool)
    num_lists, list_size = scores.shape
    shuffle = jnp.argsort(jax.random.uniform(key, (num_lists, list_size)), axis=-1)
    scores, lengths, mask = (jnp.take_along_axis(a, shuffle, axis=-1) for a in (scores, lengths, mask))
    # Padded entries sort after every real one; argsort is stable, so the shuffle decides among ties.
    sort_key = jnp.where(mask, lengths, jnp.inf)
    order = jnp.argsort(sort_key, axis=-1, stable=True)
    scores, mask = (jnp.take_along_axis(a, order, axis=-1) for a in (scores, mask))
    masked = jnp.where(mask, scores, _MASKED_SCORE)
    tail_logsumexp = reverse_cumulative_logsumexp(masked)
    per_entry = jnp.where(mask, tail_logsumexp - masked, 0.0)
    return jnp.mean(jnp.sum(per_entry, axis=-1))


def log_length_target(lengths: np.ndarray | jax.Array) -> jax.Array:
    """The regression target before standardisation: log(1 + output length)."""
    return jnp.log1p(jnp.asarray(lengths, jnp.float32))


def regression_loss(predictions: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean squared error between predicted and true (standardised) log lengths."""
    mask = jnp.asarray(mask, jnp.float32)
    squared = (jnp.asarray(predictions, jnp.float32) - targets) ** 2
    return jnp.sum(squared * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def bucket_edges(train_lengths: np.ndarray, num_buckets: int = NUM_BUCKETS, scheme: str = "quantile"
                 ) -> np.ndarray:
    """Inner bucket boundaries (num_buckets - 1 of them) for the length classifier.

    ``quantile`` (default): at the quantiles of the training lengths, so buckets hold equal shares of the data;
    repeated quantiles (many equal lengths) are kept, so some buckets may be empty. ``uniform``: equal widths over
    [0, longest training length], the fixed-range buckets of S3-style classifiers.
    """
    lengths = np.asarray(train_lengths, dtype=np.float64)
    if lengths.size == 0:
        raise ValueError("bucket_edges needs at least one training length")
    if num_buckets < 2:
        raise ValueError(f"num_buckets={num_buckets} must be at least 2")
    if scheme == "quantile":
        return np.quantile(lengths, np.arange(1, num_buckets) / num_buckets).astype(np.float32)
    if scheme == "uniform":
        return np.linspace(0.0, lengths.max(), num_buckets + 1)[1:-1].astype(np.float32)
    raise ValueError(f"unknown bucket scheme {scheme!r}; choose 'quantile' or 'uniform'")


def bucketize(lengths: np.ndarray | jax.Array, edges: np.ndarray | jax.Array) -> jax.Array:
    """Bucket index of each length: 0 for the shortest bucket, len(edges) for the longest."""
    return jnp.searchsorted(jnp.asarray(edges, jnp.float32), jnp.asarray(lengths, jnp.float32), side="right")


def classify_loss(logits: jax.Array, buckets: jax.Array, mask: jax.Array) -> jax.Array:
    """Masked mean cross-entropy between bucket logits [..., num_buckets] and true bucket indices."""
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.asarray(buckets, jnp.int32)[..., None], axis=-1)[..., 0]
    mask = jnp.asarray(mask, jnp.float32)
    return -jnp.sum(picked * mask) / jnp.maximum(jnp.sum(mask), 1.0)
