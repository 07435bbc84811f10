"""The output-length ranker: a frozen backbone, a pooling rule and a small trained MLP head -> one score.

Owns:
- `RankerSpec`: everything needed to rebuild a ranker besides the head's weights (backbone source and depth,
  pooling, head shape, training method, prompt truncation, classifier bucket edges);
- `backbone_params` / `backbone_pass` / `pool`: the backbone (the serving model's own first ``n_layers`` blocks,
  run one compiled block per call by `ltr_jax.models.blockwise`, so the engine's prefills share those compiled
  blocks) and its pooling over the prompt tokens ("mean", "last" or "mean+last");
- `RankerHead`: an NNX module (feature standardisation, then Linear/GELU layers) mapping pooled features to the
  head outputs (1 score, or one logit per length bucket for the classifier);
- `RankerScorer`: serving-time scoring of many prompts at once, in jitted batches padded to the lengths of
  `length_ladder`; on request it also hands back each prompt's `BackboneState` (the backbone blocks' hidden state
  and K/V), so the engine can start that prompt's prefill at block ``n_layers`` instead of block 0; with a shared
  prefix (the chat template's fixed header) cached, a prompt's pass runs only its tokens after the prefix.

Score convention: HIGHER score = SHORTER expected output (runs first), for every method.
"""

from __future__ import annotations

import collections
import itertools
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ltr_jax.models import blockwise
from ltr_jax.models.config import LlamaConfig
from ltr_jax.models.llama import BackboneState, fuse_layer
from ltr_jax.models.padding import length_bucket, length_ladder

POOLINGS = ("mean", "last", "mean+last")
METHODS = ("listmle", "regression", "classify")


# ------------------------------------------------------------------------------------------------ spec
@dataclass(frozen=True)
class RankerSpec:
    """The shape and recipe of one ranker (saved as JSON beside the head's checkpoint)."""

    method: str = "listmle"
    model_source: str | None = None  # what `ltr_jax.models.loading.load_model` takes; None = embedded default
    model_name: str = ""  # LlamaConfig.name of the backbone, checked when restoring
    model_dim: int = 0  # LlamaConfig.dim of the backbone
    n_layers: int = 4
    pooling: str = "mean"
    hidden_dims: tuple[int, ...] = (128,)
    num_outputs: int = 1
    max_prompt_len: int = 512
    bucket_edges: tuple[float, ...] = field(default_factory=tuple)  # classify only: inner length boundaries

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden_dims", tuple(int(h) for h in self.hidden_dims))
        object.__setattr__(self, "bucket_edges", tuple(float(e) for e in self.bucket_edges))
        problems = []
        if self.method not in METHODS:
            problems.append(f"method={self.method!r} must be one of {METHODS}")
        if self.pooling not in POOLINGS:
            problems.append(f"pooling={self.pooling!r} must be one of {POOLINGS}")
        for name in ("model_dim", "n_layers", "num_outputs", "max_prompt_len"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)!r} must be a positive integer")
        if any(h <= 0 for h in self.hidden_dims):
            problems.append(f"hidden_dims={self.hidden_dims} must all be positive")
        if self.method == "classify" and len(self.bucket_edges) != self.num_outputs - 1:
            problems.append(f"a classifier with {self.num_outputs} buckets needs {self.num_outputs - 1} "
                            f"bucket_edges, got {len(self.bucket_edges)}")
        if self.method != "classify" and self.num_outputs != 1:
            problems.append(f"method={self.method!r} emits one score, not num_outputs={self.num_outputs}")
        if problems:
            raise ValueError("invalid RankerSpec: " + "; ".join(problems))

    @property
    def feature_dim(self) -> int:
        return self.model_dim * (2 if self.pooling == "mean+last" else 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hidden_dims"] = list(self.hidden_dims)
        d["bucket_edges"] = list(self.bucket_edges)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankerSpec:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown RankerSpec keys {unknown}; known keys: {sorted(known)}")
        return cls(**d)


# ------------------------------------------------------------------------------------------------ backbone
def truncate_prompt_tokens(tokens: Sequence[int], max_len: int, keep_tail: int = 16) -> list[int]:
    """At most ``max_len`` tokens: the head of the prompt plus its last ``keep_tail`` tokens.

    Keeping the tail keeps the chat template's generation prompt (and the end of the question) in view, which
    last-token pooling relies on. Training and serving both go through this function.
    """
    if max_len <= 0:
        raise ValueError(f"max_len={max_len} must be positive")
    tokens = [int(t) for t in tokens]
    if len(tokens) <= max_len:
        return tokens
    tail = min(keep_tail, max_len // 4)
    return tokens[: max_len - tail] + (tokens[len(tokens) - tail:] if tail else [])


def backbone_params(config: LlamaConfig, params: dict[str, Any], n_layers: int
                    ) -> tuple[LlamaConfig, dict[str, Any]]:
    """The (config, params) of the model's first ``n_layers`` blocks, as device arrays in the model's fused layout
    (no copy when they already are: `Llama.state_params`)."""
    if not 0 < n_layers <= config.n_layers:
        raise ValueError(f"ranker backbone n_layers={n_layers} must be in 1..{config.n_layers} for {config.name}")
    sub = {k: v for k, v in params.items() if k != "layers"}
    sub["layers"] = [fuse_layer(config, layer) for layer in params["layers"][:n_layers]]
    return config.replace(n_layers=n_layers), jax.tree.map(jnp.asarray, sub)


def pool(hidden: jax.Array, lengths: jax.Array, pooling: str, prefix_sum: jax.Array | None = None,
         prefix_len: int = 0) -> jax.Array:
    """Pool [B, T, D] hidden states over each row's first ``lengths`` positions -> [B, D] (or [B, 2D]).

    When the rows continue a cached prefix of ``prefix_len`` tokens, ``prefix_sum`` [D] is the sum of its hidden
    states: the mean then runs over the prefix and the row, as if the whole prompt had been passed."""
    t = hidden.shape[1]
    valid = (jnp.arange(t)[None, :] < lengths[:, None]).astype(jnp.float32)
    hidden = hidden.astype(jnp.float32)
    total = jnp.einsum("btd,bt->bd", hidden, valid)
    if prefix_len:
        total = total + prefix_sum[None, :].astype(jnp.float32)
    mean = total / jnp.maximum(lengths + prefix_len, 1)[:, None].astype(jnp.float32)
    last = jnp.take_along_axis(hidden, jnp.maximum(lengths - 1, 0)[:, None, None], axis=1)[:, 0]
    if pooling == "mean":
        return mean
    if pooling == "last":
        return last
    if pooling == "mean+last":
        return jnp.concatenate([mean, last], axis=-1)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {POOLINGS}")


# ------------------------------------------------------------------------------------------------ head
class FeatureStats(nnx.Variable):
    """Per-feature mean/std of the training features (fixed at training start, not trained)."""


class RankerHead(nnx.Module):
    """Standardise pooled features, then an MLP (GELU between layers) -> ``num_outputs`` numbers."""

    def __init__(self, feature_dim: int, hidden_dims: Sequence[int], num_outputs: int, rngs: nnx.Rngs):
        self.feature_mean = FeatureStats(jnp.zeros((feature_dim,), jnp.float32))
        self.feature_std = FeatureStats(jnp.ones((feature_dim,), jnp.float32))
        dims = [feature_dim, *hidden_dims, num_outputs]
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(dims)])

    @classmethod
    def for_spec(cls, spec: RankerSpec, seed: int = 0) -> RankerHead:
        return cls(spec.feature_dim, spec.hidden_dims, spec.num_outputs, nnx.Rngs(seed))

    def set_feature_stats(self, features: np.ndarray) -> None:
        features = np.asarray(features, np.float32)
        self.feature_mean[...] = jnp.asarray(features.mean(axis=0))
        self.feature_std[...] = jnp.asarray(features.std(axis=0) + 1e-6)

    def __call__(self, features: jax.Array) -> jax.Array:
        x = (features - self.feature_mean[...]) / self.feature_std[...]
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.gelu(x)
        return x


def scores_from_outputs(method: str, outputs: jax.Array) -> jax.Array:
    """Head outputs -> scores (higher = shorter): listmle as is, regression negated, classify -expected bucket."""
    if method == "listmle":
        return outputs[..., 0]
    if method == "regression":
        return -outputs[..., 0]
    if method == "classify":
        probs = jax.nn.softmax(outputs.astype(jnp.float32), axis=-1)
        return -jnp.sum(probs * jnp.arange(outputs.shape[-1], dtype=jnp.float32), axis=-1)
    raise ValueError(f"unknown ranking method {method!r}; choose one of {METHODS}")


# ------------------------------------------------------------------------------------------------ scoring
@partial(jax.jit, static_argnames=("pooling", "method", "graphdef", "keep_state", "prefix_len"))
def _score_pass(pooling, method, graphdef, head_state, hidden, kvs, lengths, prefix_sum, keep_state=False,
                prefix_len=0):
    """Scores of a padded batch from its pass through the backbone (hidden [B, T, D] after the last block, each
    block's (k, v) [B, KV, T, hd]); ``prefix_sum``: the hidden-state sum of the shared prefix of ``prefix_len``
    tokens the rows continue (None: none)."""
    features = pool(hidden, jnp.asarray(lengths, jnp.int32), pooling, prefix_sum, prefix_len)
    outputs = nnx.merge(graphdef, head_state)(features)
    scores = scores_from_outputs(method, outputs)
    if not keep_state:
        return scores, outputs, features, ()
    kv = jnp.stack([jnp.stack([k, v]) for k, v in kvs])  # [n_layers, 2, B, KV, T, hd]
    rows = tuple((hidden[r], kv[:, :, r]) for r in range(hidden.shape[0]))  # one buffer pair per prompt
    return scores, outputs, features, rows


@partial(jax.jit, static_argnames=("pooling", "method", "graphdef", "prefix_len"))
def _score_hidden(pooling, method, graphdef, head_state, hidden, length, prefix_sum, prefix_len):
    """Score, head outputs and pooled features of one prompt from its backbone hidden state [T, D] (``length``
    real rows)."""
    features = pool(hidden[None], length[None], pooling, prefix_sum, prefix_len)
    outputs = nnx.merge(graphdef, head_state)(features)
    return scores_from_outputs(method, outputs)[0], outputs[0], features[0]


@partial(jax.jit, static_argnames=("method", "graphdef"))
def _score_features(method, graphdef, head_state, features):
    """Scores of pooled features [N, F] under a head: the head alone, no backbone."""
    return scores_from_outputs(method, nnx.merge(graphdef, head_state)(features))


def head_scores(method: str, graphdef, head_state, features: np.ndarray) -> np.ndarray:
    """Scores [N] of pooled features [N, F] under a head (its `nnx.split`), the rows padded to a power of two: the
    number of rows varies from call to call (the requests waiting, the examples held back), and each compiled shape
    stays resident, so a few shapes serve every count."""
    features = np.asarray(features, np.float32)
    n = len(features)
    padded = np.zeros((1 << max(0, n - 1).bit_length(), features.shape[1]), np.float32)
    padded[:n] = features
    return np.asarray(_score_features(method, graphdef, head_state, padded))[:n]


@jax.jit
def _hidden_sum(hidden):
    """The sum over positions of one prompt's hidden states [1, T, D] -> [D] (float32)."""
    return hidden[0].astype(jnp.float32).sum(axis=0)


def backbone_pass(config: LlamaConfig, backbone: dict[str, Any], inv_freq: jax.Array, tokens, lengths,
                  past=None) -> tuple[jax.Array, list]:
    """Padded prompts [B, T] of ``lengths`` through the backbone, one compiled block per call (the engine's
    prefills share those blocks): (hidden [B, T, D] after the last block, each block's (k, v) [B, KV, T, hd])."""
    x = blockwise.embed(config, backbone["embed"], tokens)
    return blockwise.run_blocks(config, backbone["layers"], inv_freq, x, lengths, past)


class RankerScorer:
    """Scores prompts (token id lists, chat template already applied) with a trained head over the backbone.

    ``score(prompts)`` pads prompts into the length buckets of `length_ladder` and batches of at most ``max_batch``
    (also padded to a power of two), so a handful of compiled shapes serve every request mix. With a shared prefix
    (`set_shared_prefix`), a prompt that starts with it runs only its tokens after it, over the prefix's cached K/V.
    """

    def __init__(self, spec: RankerSpec, head: RankerHead, config: LlamaConfig, params: dict[str, Any],
                 max_batch: int = 32, min_bucket: int = 16):
        if config.dim != spec.model_dim:
            raise ValueError(f"ranker expects a backbone with dim {spec.model_dim} ({spec.model_name}), "
                             f"got {config.name} with dim {config.dim}")
        self.spec = spec
        self.max_batch = max_batch
        self.min_bucket = min_bucket
        self.backbone_config, self.backbone = backbone_params(config, params, spec.n_layers)
        self._inv_freq = blockwise.inv_freq_for(self.backbone_config)
        self._head = nnx.split(head)  # (graphdef, state), replaced whole by `swap_head`
        self.shared_prefix: tuple[int, ...] = ()
        self._prefix = None  # (per-block K/V, hidden-state sum) of the shared prefix

    def set_shared_prefix(self, tokens: Sequence[int] | None) -> int:
        """Cache the backbone's K/V and pooled hidden-state sum of ``tokens``, a prefix many prompts start with;
        None or empty turns it off. The scores stay those of the whole prompt. Returns the prefix length."""
        tokens = tuple(int(t) for t in tokens or ())
        self.shared_prefix, self._prefix = (), None
        if not tokens:
            return 0
        if len(tokens) >= self.spec.max_prompt_len:
            raise ValueError(f"a shared prefix of {len(tokens)} tokens leaves no room under the ranker's "
                             f"max_prompt_len={self.spec.max_prompt_len}")
        hidden, kvs = backbone_pass(self.backbone_config, self.backbone, self._inv_freq,
                                    np.asarray(tokens, np.int32)[None], np.asarray([len(tokens)], np.int32))
        self._prefix = (kvs, _hidden_sum(hidden))
        self.shared_prefix = tokens
        return len(tokens)

    def _split(self, prompt: list[int]) -> tuple[int, list[int]]:
        """(shared-prefix tokens the prompt starts with and goes on past, or 0; the tokens its pass runs)."""
        p = len(self.shared_prefix)
        if p and len(prompt) > p and tuple(prompt[:p]) == self.shared_prefix:
            return p, prompt[p:]
        return 0, prompt

    def pass_lengths(self, prompts: Sequence[Sequence[int]]) -> list[int]:
        """The padded lengths the passes over these prompts use (what `warmup` should compile for them)."""
        split = [self._split(truncate_prompt_tokens(p, self.spec.max_prompt_len)) for p in prompts]
        return sorted({length_bucket(len(rest), self.spec.max_prompt_len, self.min_bucket) for _, rest in split})

    def _batches(self, starts: list[int], lengths: list[int]) -> list[tuple[int, int, list[int]]]:
        """(shared-prefix length, padded length, indices) groups: prompts sorted by both, cut where either changes
        and at max_batch."""
        order = sorted(range(len(lengths)), key=lambda i: (starts[i], lengths[i]))
        groups: list[tuple[int, int, list[int]]] = []
        for i in order:
            bucket = length_bucket(lengths[i], self.spec.max_prompt_len, self.min_bucket)
            if groups and groups[-1][:2] == (starts[i], bucket) and len(groups[-1][2]) < self.max_batch:
                groups[-1][2].append(i)
            else:
                groups.append((starts[i], bucket, [i]))
        return groups

    @property
    def head(self) -> RankerHead:
        """The head scoring now (a fresh module over its arrays)."""
        return nnx.merge(*self._head)

    def swap_head(self, head: RankerHead) -> None:
        """Score with ``head`` from now on (same spec: same feature size and outputs). One attribute store, so a
        pass sees the old head or the new one, never a mix."""
        graphdef, state = nnx.split(head)
        old = jax.tree.map(lambda x: x.shape, self._head[1])
        if jax.tree.map(lambda x: x.shape, state) != old:
            raise ValueError("the new head's arrays do not match this ranker's spec")
        self._head = (graphdef, state)

    def score_features(self, features: np.ndarray) -> np.ndarray:
        """Scores [N] of pooled features [N, F] (what `raw_with_features` returned) under the current head."""
        return head_scores(self.spec.method, *self._head, features)

    def raw(self, prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """(scores [N], head outputs [N, num_outputs]) for N prompts."""
        scores, outputs, _, _ = self._run(prompts, keep_state=False)
        return scores, outputs

    def raw_with_state(self, prompts: Sequence[Sequence[int]]
                       ) -> tuple[np.ndarray, np.ndarray, list[BackboneState | None]]:
        """`raw`, plus each prompt's `BackboneState` (None for a prompt the scorer truncated: its backbone pass is
        not the start of that prompt's prefill)."""
        scores, outputs, _, states = self._run(prompts, keep_state=True)
        return scores, outputs, states

    def raw_with_features(self, prompts: Sequence[Sequence[int]], keep_state: bool = False
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[BackboneState | None]]:
        """`raw`, plus each prompt's pooled features [N, F] (the head's input, e.g. for online training) and, with
        ``keep_state``, its `BackboneState` as `raw_with_state` gives it."""
        return self._run(prompts, keep_state=keep_state)

    def _run(self, prompts: Sequence[Sequence[int]], keep_state: bool):
        full = [len(p) for p in prompts]
        prompts = [truncate_prompt_tokens(p, self.spec.max_prompt_len) for p in prompts]
        if any(len(p) == 0 for p in prompts):
            raise ValueError("cannot score an empty prompt (0 tokens)")
        starts, rests = zip(*(self._split(p) for p in prompts))
        scores = np.zeros((len(prompts),), np.float32)
        outputs = np.zeros((len(prompts), self.spec.num_outputs), np.float32)
        features = np.zeros((len(prompts), self.spec.feature_dim), np.float32)
        states: list[BackboneState | None] = [None] * len(prompts)
        head = self._head  # read once: every prompt of this call is scored by the same head, even mid-swap
        for start, padded_len, idx in self._batches(list(starts), [len(r) for r in rests]):
            batch = 1 << math.ceil(math.log2(len(idx)))
            tokens = np.zeros((batch, padded_len), np.int32)
            lengths = np.ones((batch,), np.int32)
            for row, i in enumerate(idx):
                tokens[row, : len(rests[i])] = rests[i]
                lengths[row] = len(rests[i])
            s, o, f, rows = self._score(tokens, lengths, keep_state, start, head)
            scores[idx] = np.asarray(s)[: len(idx)]
            outputs[idx] = np.asarray(o)[: len(idx)]
            features[idx] = np.asarray(f)[: len(idx)]
            for row, i in enumerate(idx):
                if keep_state and len(prompts[i]) == full[i]:
                    states[i] = BackboneState(rows[row][0], rows[row][1], len(rests[i]), start)
        return scores, outputs, features, states

    def _score(self, tokens: np.ndarray, lengths: np.ndarray, keep_state: bool, start: int, head=None):
        graphdef, head_state = head if head is not None else self._head
        past, prefix_sum = self._prefix if start else (None, None)
        hidden, kvs = backbone_pass(self.backbone_config, self.backbone, self._inv_freq, tokens, lengths, past)
        return _score_pass(self.spec.pooling, self.spec.method, graphdef, head_state, hidden, kvs, lengths,
                           prefix_sum, keep_state=keep_state, prefix_len=start)

    def score_state(self, state: BackboneState) -> tuple[float, np.ndarray]:
        """(score, head outputs) of a prompt from its pass (see `score_state_with_features`)."""
        score, outputs, _ = self.score_state_with_features(state)
        return score, outputs

    def score_state_with_features(self, state: BackboneState) -> tuple[float, np.ndarray, np.ndarray]:
        """(score, head outputs, pooled features) of a prompt from its pass through this ranker's backbone blocks, run
        elsewhere (`Engine.generate_with_pass`); the same as scoring the prompt, for the cost of the head alone."""
        if state.n_layers != self.spec.n_layers:
            raise ValueError(f"a pass through {state.n_layers} blocks cannot be scored by a ranker over "
                             f"{self.spec.n_layers}")
        start = int(state.prefix_len)
        if start and start != len(self.shared_prefix):
            raise ValueError(f"the pass continues a shared prefix of {start} tokens, but this ranker caches "
                             f"{len(self.shared_prefix)}; give the engine and the ranker the same shared prefix")
        graphdef, head_state = self._head
        score, outputs, features = _score_hidden(self.spec.pooling, self.spec.method, graphdef, head_state,
                                                 state.hidden, jnp.asarray(state.length, jnp.int32),
                                                 self._prefix[1] if start else None, start)
        return float(score), np.asarray(outputs), np.asarray(features)

    def pass_shapes(self, prompts: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
        """(shared-prefix length, padded length) of the pass over each of these prompts, without repeats, the most
        common first (ties: shorter first): the shapes a fused pass (`Engine.generate_with_pass`) compiles for
        them, in the order its warm-up should spend a budget on. Prompts the ranker would truncate are left out
        (their pass is not the start of their prefill)."""
        counts: collections.Counter = collections.Counter()
        for p in prompts:
            if 0 < len(p) <= self.spec.max_prompt_len:
                start, rest = self._split(list(p))
                counts[(start, length_bucket(len(rest), self.spec.max_prompt_len, self.min_bucket))] += 1
        return sorted(counts, key=lambda shape: (-counts[shape], shape))

    def warmup_score_state(self, shapes: Sequence[tuple[int, int]]) -> None:
        """Compile `score_state` for these (shared-prefix length, padded length) shapes."""
        dt = jnp.dtype(self.backbone_config.dtype)  # the activations' (the weights' may be narrower)
        device = jax.devices()[0]  # committed, as the engine's passes arrive: a jit signature includes it
        for start, t in shapes:
            if start and start != len(self.shared_prefix):
                continue
            hidden = jax.device_put(jnp.zeros((t, self.spec.model_dim), dt), device)
            kv = jnp.zeros((self.spec.n_layers, 2, 1, t, 1), dt)  # only its first axis is read
            self.score_state(BackboneState(hidden, kv, 1, start))

    def bucket_lengths(self) -> list[int]:
        """Every padded prompt length the scorer uses."""
        return length_ladder(self.spec.max_prompt_len, self.min_bucket)

    def warmup(self, batch_sizes: Sequence[int] = (1, 2, 4), lengths: Sequence[int] | None = None,
               keep_state: bool = False, starts: Sequence[int] | None = None) -> int:
        """Compile the scoring function for these (batch, length) shapes ahead of traffic, for whole prompts and
        (when one is set) for prompts after the shared prefix; returns how many. ``keep_state`` compiles the
        variant `raw_with_state` uses; ``starts`` keeps only those of these starts (0: whole prompts; the shared
        prefix's length: prompts after it)."""
        starts = [s for s in [0] + ([len(self.shared_prefix)] if self.shared_prefix else [])
                  if starts is None or s in starts]
        shapes = [(s, b, t) for s in starts for b in batch_sizes for t in (lengths or self.bucket_lengths())]
        for s, b, t in shapes:
            self._score(np.zeros((b, t), np.int32), np.ones((b,), np.int32), keep_state, s)
        return len(shapes)

    def score(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Scores [N] float32: higher = shorter expected output."""
        return self.raw(prompts)[0]

    def predict_buckets(self, prompts: Sequence[Sequence[int]]) -> np.ndarray:
        """Classifier rankers only: the most likely length bucket per prompt (0 = shortest)."""
        if self.spec.method != "classify":
            raise ValueError(f"predict_buckets needs a 'classify' ranker, this one is {self.spec.method!r}")
        return np.argmax(self.raw(prompts)[1], axis=-1).astype(np.int32)
