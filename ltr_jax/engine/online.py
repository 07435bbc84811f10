"""Online learning of the ranker's head from the requests the server finishes (``ranker.online``).

Owns the loop that keeps a deployed ranker current:

* `ExampleBuffer`: a bounded buffer of training examples, one per finished request: the pooled features its
  ranker pass already computed (no second pass, no prompt text) and its output length. A request cut by
  ``max_tokens``, a stop string, a cancel or a deadline is *right-censored*: its true length is at least what it
  produced. Each example is training or held-back by a hash of its request id.
* `censored_pair_mask` / `pairwise_loss`: the loss only counts pairs whose order is known: ``i`` is known to be
  shorter than ``j`` when ``i`` finished on its own (exact) and ``j`` produced more tokens than ``i`` (exact or
  censored). A censored request is never treated as ending where it was cut.
* `OnlineLearner`: a background thread. Every ``min_new`` finished requests (sooner while the buffer is young) or
  ``interval_s`` it fits a candidate head warm-started from the live one: ``steps_per_round`` steps within
  ``max_train_s``, at a duty cycle of ``cpu_share`` (it sleeps between steps), and no round while its compute
  time exceeds ``max_train_share`` of the time since it started. When the server started from a trained head
  that no round accepted (one fitted to other traffic may not adapt to this), a second lineage trained from
  scratch fits a candidate too, until one of its heads is accepted (``fresh_lineage``). It judges the candidates
  and the live head by concordance on the held-back examples and accepts the best candidate only when it wins by
  ``margin``. An accepted head is exported (Orbax, versioned, in ``dir``) and handed to the ranking stage, which
  swaps it in at the next batch boundary and rescores every request still here from its kept features, so one
  head orders the queue.
* `newest_accepted_head`: at start-up, the newest valid export in ``dir`` (a corrupt newest one is skipped with
  one log line).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import math
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ltr_jax.engine.settings import OnlineLearningConfig
from ltr_jax.models.ranker import RankerHead, RankerSpec, head_scores, scores_from_outputs
from ltr_jax.models.ranker_checkpoint import RankerCheckpointError, load_ranker, save_ranker

log = logging.getLogger(__name__)

VERSION_DIR = re.compile(r"^v(\d{6})$")
BATCH = 256  # examples per training step
LEARNING_RATE = 1e-3
WEIGHT_DECAY = 1e-4


@dataclass(frozen=True)
class Example:
    features: np.ndarray  # [F] float32: the pooled features the ranker's pass computed
    length: int  # tokens produced
    censored: bool  # True: the true length is at least ``length`` (cut by max_tokens, stop string, cancel, ...)


def is_held_back(request_id: str, fraction: float) -> bool:
    digest = hashlib.sha256(f"online-holdout\0{request_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < fraction


class ExampleBuffer:
    """At most ``capacity`` examples (the oldest dropped first), training and held-back apart; thread-safe."""

    def __init__(self, capacity: int, holdout_fraction: float):
        self.capacity = capacity
        self.holdout_fraction = holdout_fraction
        self._train: collections.deque[Example] = collections.deque()
        self._held: collections.deque[Example] = collections.deque()
        self._order: collections.deque[bool] = collections.deque()  # True = held back, in arrival order
        self._lock = threading.Lock()
        self.added = 0

    def add(self, request_id: str, example: Example) -> None:
        held = is_held_back(request_id, self.holdout_fraction)
        with self._lock:
            (self._held if held else self._train).append(example)
            self._order.append(held)
            while len(self._order) > self.capacity:
                (self._held if self._order.popleft() else self._train).popleft()
            self.added += 1

    def __len__(self) -> int:
        return len(self._order)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(e.features.nbytes for e in (*self._train, *self._held))

    def snapshot(self) -> tuple[list[Example], list[Example]]:
        with self._lock:
            return list(self._train), list(self._held)


def stack(examples: list[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [N, F], lengths [N], exact [N] bool)."""
    return (np.stack([e.features for e in examples]).astype(np.float32),
            np.array([e.length for e in examples], np.float32), np.array([not e.censored for e in examples]))


def censored_pair_mask(lengths: jax.Array, exact: jax.Array) -> jax.Array:
    """[N, N] mask of the pairs (i, j) known to have i shorter than j: i is exact and j produced more tokens
    (numpy arrays in, numpy out)."""
    return exact[:, None] & (lengths[None, :] > lengths[:, None])


def pairwise_loss(scores: jax.Array, lengths: jax.Array, exact: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean logistic loss over the known pairs: the shorter one of each should score higher."""
    mask = censored_pair_mask(lengths, exact) & valid[:, None] & valid[None, :]
    margin = scores[:, None] - scores[None, :]
    losses = jax.nn.softplus(-margin)
    return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def concordance_tau(scores: np.ndarray, lengths: np.ndarray, exact: np.ndarray) -> float:
    """2C - 1 over the known pairs (Harrell's concordance with censoring; 1 = every known pair in order, a tied
    score counts half). nan when no pair's order is known."""
    mask = censored_pair_mask(np.asarray(lengths), np.asarray(exact, bool))  # on the host: no compiled shapes
    if not mask.any():
        return float("nan")
    diff = np.asarray(scores)[:, None] - np.asarray(scores)[None, :]
    concordant = (diff > 0).astype(np.float64) + 0.5 * (diff == 0)
    return float(2 * concordant[mask].mean() - 1)


def live_tau_b(scores: list[float], lengths: list[int]) -> float:
    """Kendall tau-b of scores vs. the lengths of finished, uncensored requests (nan below two or when constant)."""
    from scipy.stats import kendalltau  # here, not at import: a server without online learning never loads scipy

    if len(scores) < 2 or len(set(scores)) < 2 or len(set(lengths)) < 2:
        return float("nan")
    return float(kendalltau(scores, -np.asarray(lengths, np.float64)).statistic)


def _head_scores(head: RankerHead, method: str, features: np.ndarray) -> np.ndarray:
    return head_scores(method, *nnx.split(head), features)


def has_feature_stats(head: RankerHead) -> bool:
    """False for a head never fitted (feature mean 0, std 1: its inputs are not standardised)."""
    return not (np.all(np.asarray(head.feature_mean[...]) == 0) and np.all(np.asarray(head.feature_std[...]) == 1))


class HeadTrainer:
    """`pairwise_loss` steps on a head of one structure, compiled once (every round reuses the same shapes:
    batches of `BATCH` rows, padded with masked-out rows while the buffer holds fewer)."""

    def __init__(self, spec: RankerSpec, head: RankerHead):
        graphdef = nnx.split(head, nnx.Param, ...)[0]  # the arrays come with each round: the live head's
        self.tx = tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
        method = spec.method

        def step(params, opt_state, rest, x, lengths, exact, valid):
            def loss_fn(p):
                scores = scores_from_outputs(method, nnx.merge(graphdef, p, rest)(x))
                return pairwise_loss(scores, lengths, exact, valid)

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self._step = jax.jit(step)

    def train(self, live: RankerHead, train: list[Example], max_steps: int, max_seconds: float, cpu_share: float,
              seed: int, stop: threading.Event | None = None) -> tuple[RankerHead, int, float]:
        """A copy of ``live`` after at most ``max_steps`` steps on ``train`` within ``max_seconds`` of wall clock
        at a duty cycle of ``cpu_share``; returns (candidate, steps, seconds spent computing, sleeps excluded)."""
        head = nnx.clone(live)
        feats, lengths, exact = stack(train)
        if not has_feature_stats(head):  # an untrained head: standardise its inputs by what the buffer holds
            head.set_feature_stats(feats)
        _, params, rest = nnx.split(head, nnx.Param, ...)
        opt_state = self.tx.init(params)
        rng = np.random.default_rng(seed)
        n = len(train)
        take = min(BATCH, n)
        valid = np.arange(BATCH) < take
        deadline = time.monotonic() + max_seconds
        steps, computing = 0, 0.0
        while steps < max_steps and time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            t0 = time.monotonic()
            idx = np.resize(rng.choice(n, size=take, replace=False), BATCH)  # padding rows repeat, masked out
            params, opt_state, loss = self._step(params, opt_state, rest, jnp.asarray(feats[idx]),
                                                 jnp.asarray(lengths[idx]), jnp.asarray(exact[idx]),
                                                 jnp.asarray(valid))
            jax.block_until_ready(loss)
            steps += 1
            spent = time.monotonic() - t0
            computing += spent
            if cpu_share < 1:  # hold at most cpu_share of the time: sleep the rest of each step's share
                time.sleep(min(spent * (1 - cpu_share) / cpu_share, max(0.0, deadline - time.monotonic())))
        nnx.update(head, params)
        return head, steps, computing


# ------------------------------------------------------------------------------------------------ versions
def version_dirs(root: str | Path) -> list[tuple[int, Path]]:
    """(version, path) of every export under ``root``, newest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := VERSION_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def newest_accepted_head(root: str | Path | None, spec: RankerSpec) -> tuple[int, RankerHead, dict] | None:
    """(version, head, metadata) of the newest export in ``root`` that restores and fits ``spec``; a broken one is
    skipped with one warning naming it. None when there is none."""
    if root is None:
        return None
    for version, path in version_dirs(root):
        try:
            head, stored, meta = load_ranker(path)
        except RankerCheckpointError as err:
            log.warning("online ranker: skipping version %d at %s (%s); trying the previous one", version, path, err)
            continue
        if stored.feature_dim != spec.feature_dim or stored.num_outputs != spec.num_outputs or \
                stored.method != spec.method or stored.hidden_dims != spec.hidden_dims:
            log.warning("online ranker: skipping version %d at %s (its head does not fit the ranker served now)",
                        version, path)
            continue
        return version, head, meta
    return None


# ------------------------------------------------------------------------------------------------ the learner
class OnlineLearner:
    """Collects finished requests and retrains the head in a background thread (see the module docstring).

    The ranking stage calls `observe` when a scored request finishes and `take_accepted` at batch boundaries;
    `start` / `stop` run the thread. ``clock`` is injectable so tests drive `interval_s` without sleeping.
    """

    def __init__(self, config: OnlineLearningConfig, spec: RankerSpec, live_head: RankerHead, version: int = 0,
                 clock=time.monotonic, seed: int = 0):
        self.config = config
        self.spec = spec
        self.buffer = ExampleBuffer(config.buffer_size, config.holdout_fraction)
        self._live = nnx.clone(live_head)
        # A head trained elsewhere may not adapt to this traffic (its input scaling and weights were fitted to
        # other features): a second lineage, started from scratch, trains beside it until one of its heads wins.
        # A head this learner accepted before a restart (version > 0) was fitted to this traffic already.
        self._fresh = RankerHead.for_spec(spec, seed=seed + 1) if config.fresh_lineage and version == 0 and \
            has_feature_stats(live_head) else None
        self.version = version
        self.clock = clock
        self.seed = seed
        self._trainer: HeadTrainer | None = None  # built at the first round (compiles its step once)
        self._accepted: tuple[int, RankerHead] | None = None  # handed over at the next batch boundary
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = self._last_round = clock()
        self.training = False  # a round is running in the background thread
        self._added_at_last_round = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque(maxlen=256)  # (score, exact length)
        self.round_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)  # the latest rounds
        self.metrics: dict[str, Any] = {"rounds": 0, "accepted": 0, "rejected": 0, "train_seconds": 0.0,
                                        "train_steps": 0,
                                        "last_candidate_tau": None, "last_live_tau": None}

    # -- called from the engine thread
    def observe(self, request_id: str, features: np.ndarray, score: float, length: int, censored: bool) -> None:
        self.buffer.add(request_id, Example(np.asarray(features, np.float32), int(length), bool(censored)))
        if not censored:
            self._recent.append((float(score), int(length)))
        if self.due():
            self._wake.set()

    def take_accepted(self) -> tuple[int, RankerHead] | None:
        """The newest accepted head not yet swapped in (once), or None."""
        accepted, self._accepted = self._accepted, None
        return accepted

    # -- state
    def due(self) -> bool:
        """Whether a round should start: enough examples, something new, the trainer within its share of time
        (``max_train_share`` of the seconds since it started), and ``min_new`` new examples (fewer while the
        buffer is young: as many as it held at the last round, so the first rounds come at ``min_examples``,
        twice that, four times ...) or ``interval_s`` since the last round."""
        added = self.buffer.added
        new = added - self._added_at_last_round
        if len(self.buffer) < self.config.min_examples or new == 0:
            return False
        if self.metrics["train_seconds"] > self.config.max_train_share * (self.clock() - self._started):
            return False
        wanted = min(self.config.min_new, max(self._added_at_last_round, self.config.min_examples))
        return new >= wanted or self.clock() - self._last_round >= self.config.interval_s

    def stats(self) -> dict[str, float]:
        """What `/metrics` shows of online learning (``online_*`` keys; nan live tau before two finished)."""
        return {"online_accepted_version": self.version, "online_rounds": self.metrics["rounds"],
                "online_accepted": self.metrics["accepted"], "online_rejected": self.metrics["rejected"],
                "online_train_seconds": round(self.metrics["train_seconds"], 3),
                "online_buffer_examples": len(self.buffer), "online_live_tau_b": self.live_tau()}

    def live_tau(self) -> float:
        recent = list(self._recent)  # one copy under the GIL: the engine thread may append meanwhile
        scores, lengths = zip(*recent) if recent else ((), ())
        return live_tau_b(list(scores), list(lengths))

    # -- one round (the thread's body; callable directly)
    def run_round(self) -> bool:
        """Train a candidate, judge it, accept it or not; True when accepted."""
        self._last_round = self.clock()
        self._added_at_last_round = self.buffer.added
        train, held = self.buffer.snapshot()
        if len(train) < 2 or len(held) < 2:
            return False
        if self._trainer is None:
            self._trainer = HeadTrainer(self.spec, self._live)
        deadline = time.monotonic() + self.config.max_train_s
        feats, lengths, exact = stack(held)
        judged = []  # (held-back tau, candidate, from the fresh lineage)
        for parent, fresh in ((self._live, False), (self._fresh, True)):
            if parent is None:
                continue
            candidate, steps, computing = self._trainer.train(
                parent, train, self.config.steps_per_round, max(0.0, deadline - time.monotonic()),
                self.config.cpu_share, self.seed + self.metrics["rounds"], self._stop)
            self.metrics["train_seconds"] += computing
            self.metrics["train_steps"] += steps
            judged.append((concordance_tau(_head_scores(candidate, self.spec.method, feats), lengths, exact),
                           candidate, fresh))
        if self._fresh is not None:
            self._fresh = judged[-1][1]  # the fresh lineage goes on from its newest head
        cand_tau, candidate, fresh = max(judged, key=lambda j: -math.inf if math.isnan(j[0]) else j[0])
        live_tau = concordance_tau(_head_scores(self._live, self.spec.method, feats), lengths, exact)
        self.metrics.update(last_candidate_tau=cand_tau, last_live_tau=live_tau)
        won = cand_tau > live_tau + self.config.margin  # nan (no known pair) never wins
        self.round_log.append({"examples": len(train), "held_back": len(held), "live_tau": live_tau,
                               "candidate_taus": {"fresh" if f else "warm": t for t, _, f in judged},
                               "accepted": "fresh" if won and fresh else "warm" if won else None})
        if not won:
            self.metrics["rejected"] += 1
            self.metrics["rounds"] += 1  # with its outcome, so a scrape sees rounds = accepted + rejected
            return False
        self.version += 1
        self._live = candidate
        if fresh:  # the lineages meet: training goes on from the live head alone
            self._fresh = None
        if self.config.dir is not None:
            save_ranker(Path(self.config.dir) / f"v{self.version:06d}", candidate, self.spec, extra={
                "online_version": self.version, "holdout_tau": cand_tau, "previous_holdout_tau": live_tau,
                "examples": len(train) + len(held),
                "lineage": "fresh" if fresh else "live", "date": time.strftime("%Y-%m-%d %H:%M:%S")})
        self._accepted = (self.version, nnx.clone(candidate))
        self.metrics["accepted"] += 1
        self.metrics["rounds"] += 1
        log.info("online ranker: version %d accepted (held-back tau %.3f over the live head's %.3f%s)",
                 self.version, cand_tau, live_tau, "; trained from scratch" if fresh else "")
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="online-ranker", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(timeout=min(self.config.interval_s, 5.0))
            self._wake.clear()
            if self._stop.is_set():
                return
            if self.due():
                self.training = True
                try:
                    self.run_round()
                except Exception:  # a failed round keeps the live head, and the server serving
                    log.exception("online ranker: a training round failed; the live head stays")
                finally:
                    self.training = False
