"""The one padding ladder: every padded sequence length a compiled prefill or ranker pass uses.

Both the engine's prefill buckets and the ranker's pass lengths come from `length_ladder`, so a prompt's ranker
pass and the rest of its prefill share one padded length. The ladder holds the powers of two from ``min_bucket``
(16, 32, 64, 128, ...), then ``max_len`` itself: padding wastes under half a row (a quarter on average), and each
doubling of the longest prompt adds one compiled shape. Every compiled shape costs compile time and resident
memory for as long as the process runs (benchmarks/RESULTS.md measures both), so the ladder is kept coarse; the
padded rows cost prompt compute only.
"""

from __future__ import annotations

import functools
import math


@functools.lru_cache(maxsize=256)
def _ladder(max_len: int, min_bucket: int) -> tuple[int, ...]:
    steps, n = {max_len, min(min_bucket, max_len)}, 1 << math.ceil(math.log2(min_bucket))
    while n < max_len:
        steps.add(n)
        n *= 2
    return tuple(sorted(steps))


def length_ladder(max_len: int, min_bucket: int = 16) -> list[int]:
    """Every padded length up to ``max_len`` (see the module docstring)."""
    if max_len <= 0 or min_bucket <= 0:
        raise ValueError(f"max_len={max_len} and min_bucket={min_bucket} must be positive")
    return list(_ladder(int(max_len), int(min_bucket)))


def length_bucket(n: int, max_len: int, min_bucket: int = 16) -> int:
    """The padded length for an n-token sequence: the smallest step of `length_ladder` >= n, capped at max_len."""
    return next(m for m in length_ladder(max_len, min_bucket) if m >= min(n, max_len))
