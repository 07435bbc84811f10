"""Frozen backbone features for ranker training, computed once and cached on disk.

Training the head over cached features is what makes the default recipe fast on a CPU: the backbone (the
serving model's first ``n_layers`` blocks) runs once per prompt, in length-sorted batches padded to a few
bucket lengths (so XLA compiles a handful of shapes), and both poolings ("mean" and "last") are stored.

The cache is one ``.npz`` per (model fingerprint, n_layers), holding a row per prompt keyed by a hash of the
prompt's token ids; asking for new prompts computes only the missing rows and rewrites the file atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from ltr_jax.models.config import LlamaConfig
from ltr_jax.models.llama import hidden_states
from ltr_jax.models.ranker import POOLINGS, backbone_params, pool

# Padded prompt lengths: multiples of 16 up to 128 tokens, then multiples of 64 (few shapes, little padding).
_FINE_STEP, _FINE_LIMIT, _COARSE_STEP = 16, 128, 64


@dataclass
class FeatureSet:
    """Pooled backbone features for a list of prompts (row i = prompt i)."""

    mean: np.ndarray  # [N, D]
    last: np.ndarray  # [N, D]
    seconds: float = 0.0  # wall time spent computing the rows that were not cached
    computed: int = 0  # how many rows were computed (the rest came from the cache)

    def select(self, pooling: str) -> np.ndarray:
        if pooling == "mean":
            return self.mean
        if pooling == "last":
            return self.last
        if pooling == "mean+last":
            return np.concatenate([self.mean, self.last], axis=1)
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


def model_fingerprint(config: LlamaConfig, params: dict[str, Any]) -> str:
    """A short hash of the model's config and a sample of its weights (distinguishes checkpoints of one shape)."""
    h = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(np.asarray(params["embed"])[:8]).tobytes())
    h.update(np.ascontiguousarray(np.asarray(params["layers"][0]["wo"])[:8]).tobytes())  # in either layer layout
    h.update(np.ascontiguousarray(np.asarray(params["layers"][-1]["w_down"])[:8]).tobytes())
    return h.hexdigest()[:16]


def prompt_key(tokens: Sequence[int]) -> str:
    return hashlib.sha1(np.asarray(tokens, np.int32).tobytes()).hexdigest()


def padded_length(n: int) -> int:
    if n <= _FINE_LIMIT:
        return max(_FINE_STEP, -(-n // _FINE_STEP) * _FINE_STEP)
    return -(-n // _COARSE_STEP) * _COARSE_STEP


@partial(jax.jit, static_argnames=("config",))
def _mean_and_last(config: LlamaConfig, params: dict[str, Any], tokens, lengths):
    hidden = hidden_states(config, params, tokens, lengths, config.n_layers)
    return pool(hidden, lengths, "mean"), pool(hidden, lengths, "last")


def compute_features(config: LlamaConfig, params: dict[str, Any], prompts: Sequence[Sequence[int]],
                     n_layers: int, token_budget: int = 4096, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(mean, last) pooled features [N, D] of the first ``n_layers`` blocks, batched by padded length."""
    sub_config, sub_params = backbone_params(config, params, n_layers)
    n = len(prompts)
    mean = np.zeros((n, config.dim), np.float32)
    last = np.zeros((n, config.dim), np.float32)
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    batches: list[tuple[int, list[int]]] = []
    for i in order:
        if len(prompts[i]) == 0:
            raise ValueError(f"prompt {i} has no tokens; every ranker prompt needs at least one")
        t = padded_length(len(prompts[i]))
        if batches and batches[-1][0] == t and len(batches[-1][1]) < max(1, token_budget // t):
            batches[-1][1].append(i)
        else:
            batches.append((t, [i]))
    bar = tqdm(total=n, desc=f"ranker features ({n_layers} layers)", unit="prompt", disable=not progress)
    for t, idx in batches:
        rows = max(1, token_budget // t)  # fixed batch per length: one compiled shape per bucket
        tokens = np.zeros((rows, t), np.int32)
        lengths = np.ones((rows,), np.int32)
        for r, i in enumerate(idx):
            tokens[r, : len(prompts[i])] = prompts[i]
            lengths[r] = len(prompts[i])
        m, last_rows = _mean_and_last(sub_config, sub_params, tokens, lengths)
        mean[idx] = np.asarray(m)[: len(idx)]
        last[idx] = np.asarray(last_rows)[: len(idx)]
        bar.update(len(idx))
    bar.close()
    return mean, last


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_features(config: LlamaConfig, params: dict[str, Any], prompts: Sequence[Sequence[int]],
                    n_layers: int, cache_dir: str | Path | None, progress: bool = True,
                    token_budget: int = 4096) -> FeatureSet:
    """Features for ``prompts``, reusing and extending the on-disk cache (``cache_dir=None`` disables it)."""
    keys = [prompt_key(p) for p in prompts]
    known: dict[str, int] = {}
    stored_mean = stored_last = np.zeros((0, config.dim), np.float32)
    stored_keys: list[str] = []
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"{model_fingerprint(config, params)}-L{n_layers}.npz"
        if path.exists():
            try:
                with np.load(path) as z:
                    stored_keys = [str(k) for k in z["keys"]]
                    stored_mean, stored_last = z["mean"], z["last"]
                if stored_mean.shape != (len(stored_keys), config.dim) or stored_last.shape != stored_mean.shape:
                    raise ValueError(f"arrays of shape {stored_mean.shape}/{stored_last.shape} for "
                                     f"{len(stored_keys)} keys and dim {config.dim}")
            except Exception as err:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
                print(f"ranker feature cache {path} is unreadable ({err}); recomputing it")
                stored_keys, stored_mean, stored_last = [], stored_mean[:0], stored_last[:0]
            known = {k: i for i, k in enumerate(stored_keys)}
    missing = sorted({k for k in keys if k not in known})
    start = time.perf_counter()
    if missing:
        first = {}
        for k, p in zip(keys, prompts):
            first.setdefault(k, p)
        new_mean, new_last = compute_features(config, params, [first[k] for k in missing], n_layers,
                                              token_budget=token_budget, progress=progress)
        stored_keys = stored_keys + missing
        stored_mean = np.concatenate([stored_mean, new_mean])
        stored_last = np.concatenate([stored_last, new_last])
        known = {k: i for i, k in enumerate(stored_keys)}
        if path is not None:
            _save_atomic(path, keys=np.array(stored_keys), mean=stored_mean, last=stored_last)
    seconds = time.perf_counter() - start
    rows = [known[k] for k in keys]
    return FeatureSet(stored_mean[rows], stored_last[rows], seconds=seconds, computed=len(missing))
