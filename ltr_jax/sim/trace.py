"""Workload traces for the simulator: arrival processes, output/prompt lengths, synthetic ranker scores.

A trace is a list of `TraceEntry(arrival_time, prompt_len, output_len, score, bucket)`.

* Arrivals: ``poisson`` (exponential gaps), ``gamma`` (gamma gaps with a given coefficient of variation; CV > 1
  is burstier than Poisson), ``burst`` (everything at t = 0).
* Lengths: a JSONL label file (``output_tokens`` or ``output_len`` per line, optional ``prompt_tokens`` /
  ``prompt_len``), or the shared prompts' ``reference`` answers approximated as whitespace words x 1.3.
* Scores: when no ranker is at hand, `synthesize_scores` adds Gaussian noise to log(length), with the noise
  scale searched so Kendall's tau between score and -length hits a target (the paper's ranker reaches ~0.5-0.64).
  ``bucket`` (for ``classify``) is the quantile bin of the same noisy estimate.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

ARRIVAL_PROCESSES = ("poisson", "gamma", "burst")
WORDS_TO_TOKENS = 1.3


class TraceEntry(NamedTuple):
    arrival_time: float
    prompt_len: int
    output_len: int
    score: float = 0.0
    bucket: int = 0


# ---------------------------------------------------------------------- arrivals
def make_arrivals(process: str, n: int, rate: float | None = None, cv: float = 1.0, seed: int = 0) -> np.ndarray:
    """``n`` sorted arrival times (seconds, first at the first gap) for the named process."""
    if n < 0:
        raise ValueError(f"number of arrivals must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    if process == "burst":
        return np.zeros(n)
    if process not in ARRIVAL_PROCESSES:
        raise ValueError(f"unknown arrival process {process!r}; valid: {', '.join(ARRIVAL_PROCESSES)}")
    if rate is None or not rate > 0:
        raise ValueError(f"arrival process {process!r} needs a rate > 0 requests/s, got {rate!r}")
    if process == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n)
    else:
        if not cv > 0:
            raise ValueError(f"gamma arrivals need cv > 0, got {cv!r}")
        shape = 1.0 / cv**2
        gaps = rng.gamma(shape, 1.0 / (rate * shape), size=n)
    return np.cumsum(gaps)


# ---------------------------------------------------------------------- scores
def kendall_tau_vs_length(scores: Sequence[float], lengths: Sequence[float]) -> float:
    """Kendall's tau-b between score and -length (1.0 = scores rank lengths perfectly, shortest highest)."""
    from scipy.stats import kendalltau

    return float(kendalltau(np.asarray(scores), -np.asarray(lengths, dtype=float)).statistic)


def synthesize_scores(
    lengths: Sequence[int], target_tau: float, seed: int = 0, sample: int = 4000
) -> tuple[np.ndarray, float]:
    """Noisy ranker scores for true ``lengths``: ``-(log L + N(0, sigma))`` with sigma chosen by bisection so
    Kendall's tau(score, -L) ~= ``target_tau``. Returns (scores, achieved tau on all requests)."""
    if not 0 < target_tau <= 1:
        raise ValueError(f"target Kendall tau must be in (0, 1], got {target_tau!r}")
    log_len = np.log(np.asarray(lengths, dtype=float))
    rng = np.random.default_rng(seed)
    unit_noise = rng.standard_normal(len(log_len))
    if target_tau >= 1.0 or np.ptp(log_len) == 0:
        return -log_len, kendall_tau_vs_length(-log_len, lengths) if len(log_len) > 1 else 1.0
    idx = rng.choice(len(log_len), size=min(sample, len(log_len)), replace=False)

    def tau_at(sigma: float) -> float:
        return kendall_tau_vs_length(-(log_len[idx] + sigma * unit_noise[idx]), np.exp(log_len[idx]))

    lo, hi = 0.0, 1.0
    while tau_at(hi) > target_tau and hi < 1e3:
        hi *= 2
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if tau_at(mid) > target_tau:
            lo = mid
        else:
            hi = mid
    scores = -(log_len + 0.5 * (lo + hi) * unit_noise)
    return scores, kendall_tau_vs_length(scores, lengths)


def score_buckets(scores: Sequence[float], num_buckets: int) -> np.ndarray:
    """Quantile classes of the scores: bucket 0 = highest scores (expected shortest) ... num_buckets-1."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    neg = -np.asarray(scores, dtype=float)
    edges = np.quantile(neg, np.linspace(0, 1, num_buckets + 1)[1:-1]) if len(neg) else []
    return np.searchsorted(edges, neg, side="right").astype(int)


# ---------------------------------------------------------------------- lengths
def shared_dir() -> Path:
    """The shared read-only data directory (``$LTR_JAX_SHARED`` or ``<repo>/../shared``)."""
    env = os.environ.get("LTR_JAX_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared"


def shared_prompts_path() -> Path:
    path = shared_dir() / "data" / "prompts.jsonl"
    if not path.is_file():
        raise FileNotFoundError(
            f"shared prompts not found at {path}; set LTR_JAX_SHARED to the shared directory, or pass a label "
            "JSONL with output_tokens/output_len per line"
        )
    return path


def approx_tokens(text: str) -> int:
    return max(1, round(len(text.split()) * WORDS_TO_TOKENS))


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None
    return rows


def load_lengths(labels: str | Path | None = None, prompts: str | Path | None = None
                 ) -> tuple[list[tuple[int, int]], str]:
    """(prompt_len, output_len) pairs and a sentence saying where they came from.

    With ``labels``: each line needs ``output_tokens`` or ``output_len``; the prompt length comes from
    ``prompt_tokens``/``prompt_len`` when present, else from the shared prompt with the same ``id`` (words x 1.3).
    Without: the shared prompts' ``reference`` answers, whitespace words x 1.3.
    """
    prompt_rows = None
    if labels is None or prompts is not None:
        prompt_rows = _read_jsonl(Path(prompts) if prompts is not None else shared_prompts_path())
    if labels is None:
        pairs = [(approx_tokens(r["prompt"]), approx_tokens(r["reference"])) for r in prompt_rows]
        return pairs, "output lengths approximated from shared prompts' reference answers (whitespace words x 1.3)"
    path = Path(labels)
    if not path.is_file():
        raise FileNotFoundError(f"label file {path} not found")
    rows = _read_jsonl(path)
    prompt_by_id: dict[str, int] = {}
    pairs: list[tuple[int, int]] = []
    prompt_source = "label file prompt_tokens/prompt_len"
    for i, row in enumerate(rows):
        out = row.get("output_tokens", row.get("output_len"))
        if not isinstance(out, int) or out < 0:
            raise ValueError(f"{path}: line {i + 1} needs an integer output_tokens or output_len, got {out!r}")
        prompt = row.get("prompt_tokens", row.get("prompt_len"))
        if prompt is None:
            if not prompt_by_id:
                if prompt_rows is None:
                    try:
                        prompt_rows = _read_jsonl(shared_prompts_path())
                    except FileNotFoundError:
                        prompt_rows = []
                prompt_by_id = {r["id"]: approx_tokens(r["prompt"]) for r in prompt_rows}
            prompt = prompt_by_id.get(row.get("id"))
            if prompt is None:
                raise ValueError(
                    f"{path}: line {i + 1} has no prompt_tokens/prompt_len and its id {row.get('id')!r} is not "
                    "among the shared prompts; add prompt_tokens to the label file"
                )
            prompt_source = "prompt lengths from the shared prompts by id (words x 1.3)"
        pairs.append((max(1, int(prompt)), max(1, out)))
    if not pairs:
        raise ValueError(f"{path}: no labelled requests")
    return pairs, f"output lengths from label file {path}; {prompt_source}"


# ---------------------------------------------------------------------- traces
def make_trace(
    pairs: Sequence[tuple[int, int]],
    n: int,
    rate: float | None,
    arrival: str = "poisson",
    cv: float = 1.0,
    target_tau: float = 0.55,
    num_buckets: int = 8,
    seed: int = 0,
    scores_of_pairs: Sequence[float] | None = None,
) -> tuple[list[TraceEntry], dict]:
    """Sample ``n`` (prompt_len, output_len) pairs with replacement and give them arrivals and scores: synthetic
    ones of ``target_tau``, or with ``scores_of_pairs`` (one per pair, e.g. a real ranker's) each pair's own."""
    if not pairs:
        raise ValueError("make_trace needs at least one (prompt_len, output_len) pair")
    if scores_of_pairs is not None and len(scores_of_pairs) != len(pairs):
        raise ValueError(f"scores_of_pairs has {len(scores_of_pairs)} scores for {len(pairs)} pairs")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(pairs), size=n)
    chosen = [pairs[i] for i in picks]
    arrivals = make_arrivals(arrival, n, rate, cv, seed=seed + 1)
    outputs = [o for _, o in chosen]
    if scores_of_pairs is None:
        scores, tau = synthesize_scores(outputs, target_tau, seed=seed + 2)
        how = f"synthetic: -(log output_len + gaussian noise), noise tuned to Kendall tau {target_tau}"
    else:
        scores = np.asarray(scores_of_pairs, dtype=float)[picks]
        tau = kendall_tau_vs_length(scores, outputs)
        how = "given: one score per prompt (a ranker's), repeated prompts keep theirs"
    buckets = score_buckets(scores, num_buckets)
    trace = [
        TraceEntry(float(t), int(p), int(o), float(s), int(b))
        for t, (p, o), s, b in zip(arrivals, chosen, scores, buckets)
    ]
    info = {
        "n": n,
        "arrival": arrival,
        "rate": rate,
        "cv": cv if arrival == "gamma" else None,
        "scores": how,
        "achieved_kendall_tau": round(tau, 4),
        "classify_buckets": f"{num_buckets} quantile classes of the same scores",
        "mean_output_len": float(np.mean(outputs)) if outputs else math.nan,
        "mean_prompt_len": float(np.mean([p for p, _ in chosen])) if chosen else math.nan,
    }
    return trace, info


def make_poisson_trace(lengths: Sequence[int], rate: float, n: int, seed: int = 0, prompt_len: int = 128,
                       target_tau: float = 0.55) -> list[TraceEntry]:
    """Convenience: Poisson arrivals, fixed prompt length, output lengths sampled from ``lengths``."""
    trace, _ = make_trace([(prompt_len, int(length)) for length in lengths], n, rate, "poisson",
                          target_tau=target_tau, seed=seed)
    return trace
