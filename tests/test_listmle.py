"""ListMLE against a brute-force Plackett-Luce reference, tie handling, masking, and the other two losses."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ltr_jax.models import ranker
from ltr_jax.train import losses


def plackett_luce_nll(scores, order):
    """-log P(order) under Plackett-Luce with item weights exp(score), computed term by term."""
    total = 0.0
    remaining = list(order)
    for item in order:
        denom = sum(math.exp(scores[j]) for j in remaining)
        total -= math.log(math.exp(scores[item]) / denom)
        remaining.remove(item)
    return total


def allowed_orders(lengths):
    """Every permutation that sorts lengths ascending (ties may appear in any order)."""
    return [p for p in itertools.permutations(range(len(lengths)))
            if all(lengths[p[i]] <= lengths[p[i + 1]] for i in range(len(p) - 1))]


def test_plackett_luce_probabilities_sum_to_one_over_all_permutations():
    # Sanity of the reference itself: a distribution over all 4! orders.
    scores = [0.3, -1.2, 2.0, 0.7]
    total = sum(math.exp(-plackett_luce_nll(scores, p)) for p in itertools.permutations(range(4)))
    assert total == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_listmle_equals_brute_force_without_ties(n):
    rng = np.random.default_rng(n)
    scores = rng.normal(size=n).astype(np.float32) * 2
    lengths = rng.permutation(np.arange(1, n + 1) * 17).astype(np.float32)
    (true_order,) = allowed_orders(lengths)
    expected = plackett_luce_nll(scores.astype(np.float64), true_order)
    got = losses.listmle_loss(scores[None], lengths[None], np.ones((1, n), bool), jax.random.key(0))
    assert float(got) == pytest.approx(expected, rel=1e-5, abs=1e-5)


def test_listmle_is_minimised_by_scores_that_favour_short_outputs():
    lengths = np.array([[10.0, 200.0, 50.0, 1000.0]])
    mask = np.ones_like(lengths, bool)
    good = -np.log(lengths)  # higher score = shorter
    bad = np.log(lengths)
    key = jax.random.key(1)
    assert float(losses.listmle_loss(good, lengths, mask, key)) < float(losses.listmle_loss(bad, lengths, mask, key))


def test_listmle_with_ties_averages_over_allowed_orders():
    scores = np.array([0.5, -0.3, 1.1, 0.2, -0.8], np.float32)
    lengths = np.array([30, 10, 30, 10, 30], np.float32)  # two tie groups: {1, 3} and {0, 2, 4}
    orders = allowed_orders(lengths)
    assert len(orders) == 2 * 6
    reference = {round(plackett_luce_nll(scores.astype(np.float64), p), 4) for p in orders}
    mean_reference = np.mean([plackett_luce_nll(scores.astype(np.float64), p) for p in orders])

    def one(key):
        return losses.listmle_loss(scores[None], lengths[None], np.ones((1, 5), bool), key)

    values = np.asarray(jax.vmap(one)(jax.random.split(jax.random.key(7), 4000)))
    # Every draw is the loss of one allowed order, every allowed order shows up, and the mean matches.
    assert {round(float(v), 4) for v in values} <= reference
    assert len({round(float(v), 4) for v in values}) == len(reference)
    assert values.mean() == pytest.approx(mean_reference, rel=0.01)


def test_listmle_fixed_seed_is_deterministic_and_seed_matters_only_with_ties():
    scores = np.array([[0.5, -0.3, 1.1, 0.2]], np.float32)
    tied = np.array([[5, 5, 5, 9]], np.float32)
    untied = np.array([[5, 6, 7, 9]], np.float32)
    mask = np.ones((1, 4), bool)
    a = float(losses.listmle_loss(scores, tied, mask, jax.random.key(3)))
    b = float(losses.listmle_loss(scores, tied, mask, jax.random.key(3)))
    assert a == b
    draws = {float(losses.listmle_loss(scores, tied, mask, jax.random.key(s))) for s in range(50)}
    assert len(draws) > 1
    draws = {float(losses.listmle_loss(scores, untied, mask, jax.random.key(s))) for s in range(10)}
    assert len(draws) == 1


def test_listmle_padding_is_ignored_and_gradients_are_finite():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, 6)).astype(np.float32)
    lengths = rng.integers(1, 500, size=(2, 6)).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
    key = jax.random.key(0)
    padded = losses.listmle_loss(scores, lengths, mask, key)
    # The same lists without their padding, one at a time (mean over lists).
    first = losses.listmle_loss(scores[:1, :4], lengths[:1, :4], mask[:1, :4], key)
    second = losses.listmle_loss(scores[1:, :2], lengths[1:, :2], mask[1:, :2], key)
    assert float(padded) == pytest.approx((float(first) + float(second)) / 2, rel=1e-5)
    # Changing padded scores or lengths changes nothing, and the gradient there is zero.
    scores2 = np.where(mask, scores, 1e3).astype(np.float32)
    lengths2 = np.where(mask, lengths, 0).astype(np.float32)
    assert float(losses.listmle_loss(scores2, lengths2, mask, key)) == pytest.approx(float(padded), rel=1e-6)
    grad = jax.grad(losses.listmle_loss)(jnp.asarray(scores), lengths, mask, key)
    assert np.all(np.isfinite(grad))
    assert np.all(np.asarray(grad)[~mask] == 0)


def test_reverse_cumulative_logsumexp_is_exact_for_spread_out_scores():
    x = np.array([[300.0, -200.0, 5.0, 0.0], [1.0, 2.0, 3.0, 4.0]], np.float32)
    got = np.asarray(losses.reverse_cumulative_logsumexp(jnp.asarray(x)))
    want = np.array([[np.logaddexp.reduce(row[i:].astype(np.float64)) for i in range(4)] for row in x])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_regression_loss_is_masked_mse():
    pred = np.array([[1.0, 2.0, 3.0]])
    target = np.array([[1.5, 2.0, 100.0]])
    mask = np.array([[True, True, False]])
    assert float(losses.regression_loss(pred, target, mask)) == pytest.approx(0.25 / 2)
    assert float(losses.regression_loss(target, target, np.ones_like(mask))) == 0.0


def test_bucket_edges_split_training_lengths_into_equal_groups():
    lengths = np.arange(1, 1001)
    edges = losses.bucket_edges(lengths)
    assert edges.shape == (9,)
    buckets = np.asarray(losses.bucketize(lengths, edges))
    assert buckets.min() == 0 and buckets.max() == 9
    assert np.all(np.diff(buckets) >= 0)  # monotone in length
    counts = np.bincount(buckets, minlength=10)
    assert counts.min() >= 95 and counts.max() <= 105
    with pytest.raises(ValueError, match="at least one"):
        losses.bucket_edges(np.array([]))


def test_uniform_bucket_edges_have_equal_widths():
    edges = losses.bucket_edges(np.array([3, 10, 1000]), scheme="uniform")
    np.testing.assert_allclose(edges, np.arange(1, 10) * 100.0)
    assert np.asarray(losses.bucketize([3, 10, 1000], edges)).tolist() == [0, 0, 9]
    with pytest.raises(ValueError, match="unknown bucket scheme 'log'"):
        losses.bucket_edges(np.array([1, 2]), scheme="log")


def test_classify_loss_and_score_direction():
    buckets = np.array([[0, 9]])
    mask = np.ones((1, 2), bool)
    confident = np.full((1, 2, 10), -10.0)
    confident[0, 0, 0] = 10.0
    confident[0, 1, 9] = 10.0
    uniform = np.zeros((1, 2, 10))
    assert float(losses.classify_loss(confident, buckets, mask)) < 1e-3
    assert float(losses.classify_loss(uniform, buckets, mask)) == pytest.approx(math.log(10), rel=1e-5)
    scores = np.asarray(ranker.scores_from_outputs("classify", jnp.asarray(confident)))
    assert scores[0, 0] > scores[0, 1]  # predicted shortest bucket ranks first
    assert scores[0, 0] == pytest.approx(0.0, abs=1e-3) and scores[0, 1] == pytest.approx(-9.0, abs=1e-3)


def test_score_conventions_and_unknown_method():
    out = jnp.array([[2.0], [5.0]])
    assert np.asarray(ranker.scores_from_outputs("listmle", out)).tolist() == [2.0, 5.0]
    assert np.asarray(ranker.scores_from_outputs("regression", out)).tolist() == [-2.0, -5.0]
    with pytest.raises(ValueError, match="unknown ranking method 'pairwise'"):
        ranker.scores_from_outputs("pairwise", out)
