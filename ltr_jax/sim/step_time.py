"""Step-time models for the simulator: how long a prefill and a decode step take on the modelled accelerator.

`StepTimeModel` is the protocol (``prefill_time(n_tokens)``, ``decode_time(batch, tokens_in_cache)``, seconds).
`AnalyticStepTime` is a roofline: a step takes max(bytes moved / effective HBM bandwidth, FLOPs / effective peak)
plus a fixed per-call overhead; bytes = weights + KV cache read (decode) or written (prefill), FLOPs = 2 x params
per token + attention. `MeasuredStepTime` fits measured engine step times with linear least squares.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class StepTimeModel(Protocol):
    def prefill_time(self, n_tokens: int) -> float:
        """Seconds to prefill one sequence of ``n_tokens`` (yields its next token)."""
        ...

    def decode_time(self, batch: int, tokens_in_cache: int) -> float:
        """Seconds for one decode step of ``batch`` sequences holding ``tokens_in_cache`` KV tokens in total."""
        ...


@dataclass(frozen=True)
class AnalyticStepTime:
    n_params: float
    bytes_per_param: float
    kv_bytes_per_token: float
    attention_flops_per_token_pair: float  # FLOPs for one query token attending to one cached token
    hbm_bandwidth: float  # bytes/s
    peak_flops: float  # FLOP/s
    bandwidth_efficiency: float = 0.85
    compute_efficiency: float = 0.6
    step_overhead_s: float = 0.0

    def __post_init__(self) -> None:
        for name in ("n_params", "bytes_per_param", "kv_bytes_per_token", "hbm_bandwidth", "peak_flops"):
            if not getattr(self, name) > 0:
                raise ValueError(f"AnalyticStepTime.{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("bandwidth_efficiency", "compute_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"AnalyticStepTime.{name} must be in (0, 1], got {getattr(self, name)!r}")
        if self.attention_flops_per_token_pair < 0 or self.step_overhead_s < 0:
            raise ValueError("AnalyticStepTime: attention FLOPs and step overhead must be >= 0")

    @classmethod
    def for_llama3_8b_h100(cls, **overrides) -> AnalyticStepTime:
        """Llama-3-8B in bf16 on one H100 SXM: 8.03e9 params, 128 KiB KV per token (32 layers x 8 KV heads x
        128 dims x K,V x 2 bytes), 3.35 TB/s HBM, 989 TFLOP/s dense bf16; 85% of bandwidth, 60% of peak."""
        params = {
            "n_params": 8.03e9,
            "bytes_per_param": 2.0,
            "kv_bytes_per_token": 128 * 1024,
            "attention_flops_per_token_pair": 4 * 32 * 4096,  # QK^T and PV, 2 FLOPs per MAC, 32 layers x 4096
            "hbm_bandwidth": 3.35e12,
            "peak_flops": 989e12,
        }
        params.update(overrides)
        return cls(**params)

    def _time(self, bytes_moved: float, flops: float) -> float:
        memory_s = bytes_moved / (self.hbm_bandwidth * self.bandwidth_efficiency)
        compute_s = flops / (self.peak_flops * self.compute_efficiency)
        return max(memory_s, compute_s) + self.step_overhead_s

    def prefill_time(self, n_tokens: int) -> float:
        weights = self.n_params * self.bytes_per_param
        flops = 2.0 * self.n_params * n_tokens + self.attention_flops_per_token_pair * n_tokens * (n_tokens + 1) / 2
        return self._time(weights + n_tokens * self.kv_bytes_per_token, flops)

    def decode_time(self, batch: int, tokens_in_cache: int) -> float:
        weights = self.n_params * self.bytes_per_param
        flops = 2.0 * self.n_params * batch + self.attention_flops_per_token_pair * tokens_in_cache
        return self._time(weights + tokens_in_cache * self.kv_bytes_per_token, flops)


@dataclass(frozen=True)
class MeasuredStepTime:
    """decode ~ c0 + c1 * batch + c2 * tokens_in_cache; prefill ~ p0 + p1 * n (+ p2 * n^2 with >= 4 lengths)."""

    decode_coefficients: tuple[float, float, float]
    prefill_coefficients: tuple[float, ...]
    min_seconds: float = 1e-6

    @classmethod
    def from_json(cls, source: str | Path | dict) -> MeasuredStepTime:
        """Fit from ``{"decode": [{"batch", "tokens_in_cache", "seconds"}], "prefill": [{"tokens", "seconds"}]}``
        given as a dict or the path of a JSON file."""
        if isinstance(source, dict):
            data, where = source, "step-time data"
        else:
            path = Path(source)
            if not path.is_file():
                raise FileNotFoundError(f"step-time file {path} not found (expected JSON with decode/prefill lists)")
            data, where = json.loads(path.read_text()), str(path)
        decode = _rows(data, "decode", ("batch", "tokens_in_cache", "seconds"), where)
        prefill = _rows(data, "prefill", ("tokens", "seconds"), where)
        if len(decode) < 3:
            raise ValueError(f"{where}: need at least 3 decode measurements to fit 3 coefficients, got {len(decode)}")
        if len(prefill) < 2:
            raise ValueError(f"{where}: need at least 2 prefill measurements, got {len(prefill)}")
        a = np.array([[1.0, r["batch"], r["tokens_in_cache"]] for r in decode])
        decode_coef = np.linalg.lstsq(a, np.array([r["seconds"] for r in decode]), rcond=None)[0]
        tokens = np.array([float(r["tokens"]) for r in prefill])
        columns = [np.ones_like(tokens), tokens]
        if len(np.unique(tokens)) >= 4:
            columns.append(tokens**2)
        prefill_coef = np.linalg.lstsq(
            np.stack(columns, axis=1), np.array([r["seconds"] for r in prefill]), rcond=None
        )[0]
        min_seconds = 0.1 * min(r["seconds"] for r in decode + prefill)
        return cls(
            tuple(float(c) for c in decode_coef), tuple(float(c) for c in prefill_coef), max(min_seconds, 1e-9)
        )

    def prefill_time(self, n_tokens: int) -> float:
        seconds = 0.0
        power = 1.0
        for coefficient in self.prefill_coefficients:
            seconds += coefficient * power
            power *= n_tokens
        return max(seconds, self.min_seconds)

    def decode_time(self, batch: int, tokens_in_cache: int) -> float:
        c0, c1, c2 = self.decode_coefficients
        return max(c0 + c1 * batch + c2 * tokens_in_cache, self.min_seconds)


def _rows(data: dict, key: str, fields: tuple[str, ...], where: str) -> list[dict]:
    rows = data.get(key) if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: expected a non-empty list under {key!r} with fields {', '.join(fields)}")
    for i, row in enumerate(rows):
        missing = [f for f in fields if not isinstance(row, dict) or f not in row]
        if missing:
            raise ValueError(f"{where}: {key}[{i}] lacks field(s) {', '.join(missing)}")
        if not all(isinstance(row[f], (int, float)) and row[f] >= 0 for f in fields):
            raise ValueError(f"{where}: {key}[{i}] has a negative or non-numeric value: {row}")
    return rows
