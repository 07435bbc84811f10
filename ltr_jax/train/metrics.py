"""Ranking quality of predicted scores against true output lengths.

Kendall's tau-b (``scipy.stats.kendalltau``) between the scores and the negated lengths (higher score = shorter
output, so a perfect ranker has tau = 1) with a paired bootstrap 95% interval (``scipy.stats.bootstrap``), the
share of correctly ordered pairs among pairs whose lengths differ (a pair the ranker scores equally counts as half
right), tau-b within each prompt source, and two baselines a ranker must beat: the source prior (rank a prompt by
the mean log length of its source in some fitting data) and the prompt's own length (a longer prompt is predicted
to get a longer answer). `evaluation` computes all of them; the trainer and `python -m ltr_jax.train.evaluate`
report it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import bootstrap, kendalltau

PRIOR_FOLDS = 5


def pair_accuracy(scores: np.ndarray, lengths: np.ndarray, max_items: int = 6000) -> float:
    """Share of pairs with different lengths that the scores put in the right order (score ties = 1/2)."""
    scores = np.asarray(scores, np.float64)
    lengths = np.asarray(lengths, np.float64)
    if len(scores) > max_items:  # O(n^2) memory: evaluate a fixed subsample of big sets
        keep = np.random.default_rng(0).choice(len(scores), max_items, replace=False)
        scores, lengths = scores[keep], lengths[keep]
    ds = np.sign(scores[:, None] - scores[None, :])
    dl = np.sign(lengths[None, :] - lengths[:, None])  # +1 where item i is shorter than item j
    upper = np.triu(np.ones_like(ds, bool), k=1)
    counted = upper & (dl != 0)
    total = counted.sum()
    if total == 0:
        return float("nan")
    agree = (ds * dl)[counted]
    return float(((agree > 0).sum() + 0.5 * (agree == 0).sum()) / total)


def ranking_metrics(scores: np.ndarray, lengths: np.ndarray) -> dict[str, float]:
    """Kendall tau-b, its p-value and pair accuracy of scores vs. true output lengths."""
    scores = np.asarray(scores, np.float64)
    lengths = np.asarray(lengths, np.float64)
    if scores.shape != lengths.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and lengths {lengths.shape} must be equal-length vectors")
    if len(scores) < 2:
        raise ValueError("ranking metrics need at least two items")
    result = kendalltau(scores, -lengths)
    return {
        "kendall_tau_b": float(result.statistic),
        "p_value": float(result.pvalue),
        "pair_accuracy": pair_accuracy(scores, lengths),
        "n": len(scores),
    }


def per_group_tau(scores: np.ndarray, lengths: np.ndarray, groups: Sequence[str]) -> dict[str, float]:
    """Kendall tau-b inside each group (e.g. each prompt source): how well the ranker orders within it."""
    groups = np.asarray(groups)
    out = {}
    for g in sorted(set(groups.tolist())):
        sel = groups == g
        if sel.sum() >= 2:
            out[g] = float(kendalltau(np.asarray(scores)[sel], -np.asarray(lengths)[sel]).statistic)
    return out


def tau_b(scores: np.ndarray, lengths: np.ndarray) -> float:
    """Kendall tau-b of scores vs. negated lengths (nan when either side is constant)."""
    return float(kendalltau(scores, -np.asarray(lengths, np.float64)).statistic)


def bootstrap_ci(scores: np.ndarray, lengths: np.ndarray, n_resamples: int = 1000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float]:
    """Percentile interval of tau-b over paired resamples of (score, length) rows."""
    scores = np.asarray(scores, np.float64)
    lengths = np.asarray(lengths, np.float64)
    if np.ptp(scores) == 0 or np.ptp(lengths) == 0:
        return (math.nan, math.nan)
    res = bootstrap((scores, lengths), lambda s, n: kendalltau(s, -n).statistic, paired=True, vectorized=False,
                    n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                    rng=np.random.default_rng(seed))
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


def tau_difference_ci(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray],
                      n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float]:
    """tau-b of ``after`` minus tau-b of ``before`` (each a (scores, lengths) sample of different rows, e.g. two
    windows of traffic) with a percentile interval over independent resamples of each sample's rows."""
    rng = np.random.default_rng(seed)
    (sa, la), (sb, lb) = ((np.asarray(x, np.float64), np.asarray(y, np.float64)) for x, y in (before, after))
    diffs = []
    for _ in range(n_resamples):
        ia, ib = rng.integers(0, len(sa), len(sa)), rng.integers(0, len(sb), len(sb))
        diffs.append(tau_b(sb[ib], lb[ib]) - tau_b(sa[ia], la[ia]))
    diffs = _finite(diffs)
    return (tau_b(sb, lb) - tau_b(sa, la), *_percentile_interval(diffs, confidence))


def paired_tau_difference_ci(before: np.ndarray, after: np.ndarray, lengths: np.ndarray, n_resamples: int = 1000,
                             seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float]:
    """tau-b of scores ``after`` minus tau-b of scores ``before`` on the same rows (e.g. the live head's and the
    starting head's scores of the same requests) with a percentile interval over resamples of those rows, each
    resample scoring both: the rows' own difficulty is common to both sides, so the interval is narrower than
    two independent samples give."""
    rng = np.random.default_rng(seed)
    before, after, lengths = (np.asarray(x, np.float64) for x in (before, after, lengths))
    diffs = []
    for _ in range(n_resamples):
        i = rng.integers(0, len(lengths), len(lengths))
        diffs.append(tau_b(after[i], lengths[i]) - tau_b(before[i], lengths[i]))
    diffs = _finite(diffs)
    if not len(diffs):
        return (math.nan, math.nan, math.nan)
    return (tau_b(after, lengths) - tau_b(before, lengths), *_percentile_interval(diffs, confidence))


def _finite(values: list[float]) -> np.ndarray:
    values = np.asarray(values)
    return values[np.isfinite(values)]


def _percentile_interval(resampled: np.ndarray, confidence: float) -> tuple[float, float]:
    """The central ``confidence`` percentile interval of bootstrap resamples."""
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(resampled, tail)), float(np.percentile(resampled, 100 - tail))


def source_prior(fit_sources: Sequence[str], fit_lengths: np.ndarray, sources: Sequence[str]) -> np.ndarray:
    """Scores from the source alone: minus the mean log length of each prompt's source in the fitting data (a
    source the fitting data lacks gets the overall mean)."""
    fit_sources = np.asarray(fit_sources)
    logs = np.log1p(np.asarray(fit_lengths, np.float64))
    overall = float(logs.mean()) if len(logs) else 0.0
    means = {s: float(logs[fit_sources == s].mean()) for s in set(fit_sources.tolist())}
    return -np.array([means.get(s, overall) for s in sources])


def cross_fitted_source_prior(ids: Sequence[str], sources: Sequence[str], lengths: np.ndarray,
                              folds: int = PRIOR_FOLDS) -> np.ndarray:
    """The source prior of each prompt fitted on the other folds of the same file (folds by a hash of the id), so
    no prompt's own length enters its score."""
    from ltr_jax.train.data import validation_fraction_of

    fold = np.array([min(int(validation_fraction_of(rid, "source-prior") * folds), folds - 1) for rid in ids])
    sources = np.asarray(sources)
    lengths = np.asarray(lengths)
    out = np.zeros(len(ids))
    for k in range(folds):
        here = fold == k
        if here.any():
            out[here] = source_prior(sources[~here], lengths[~here], sources[here])
    return out


def evaluation(scores: np.ndarray, lengths: np.ndarray, sources: Sequence[str], prompt_lens: Sequence[int],
               prior_scores: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Every reported metric of one ranker on one labelled set (see the module docstring)."""
    scores = np.asarray(scores, np.float64)
    lengths = np.asarray(lengths, np.float64)
    if scores.shape != lengths.shape or scores.ndim != 1 or len(scores) < 2:
        raise ValueError(f"need at least two scored prompts with lengths, got scores {scores.shape} and lengths "
                         f"{lengths.shape}")
    return {
        "tau_b": tau_b(scores, lengths),
        "ci95": list(bootstrap_ci(scores, lengths, n_resamples, seed)),
        "n": len(scores),
        "pair_accuracy": pair_accuracy(scores, lengths),
        "per_source": per_group_tau(scores, lengths, sources),
        "baselines": {"source_prior": tau_b(np.asarray(prior_scores), lengths),
                      "prompt_length": tau_b(-np.asarray(prompt_lens, np.float64), lengths)},
    }
