"""Ranking quality of predicted scores against true output lengths.

Kendall's tau-b (``scipy.stats.kendalltau``) between the scores and the negated lengths (higher score = shorter
output, so a perfect ranker has tau = 1), and the share of correctly ordered pairs among pairs whose lengths
differ (a pair the ranker scores equally counts as half right).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.stats import kendalltau


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
