"""The JetStream-style engine: prefill, insert into a decode slot, generate over all slots, free.

Owns the device side of serving, as `jax.jit`-compiled pure functions with static shapes. A decode step is one
compiled forward pass per cache length, then one sampling call shared by every length. A prefill runs its blocks
one compiled block per call (`ltr_jax.models.blockwise`: one compiled block serves every layer, and the ranker's
pass over the same prompt shape), then one call per prompt shape takes its last position and joins its K/V, and
one call shared by every shape samples its first token:

* `prefill(tokens, sampling)`      -> `Prefix`: the prompt (padded to a length bucket) run causally; its K/V and its
                                      first sampled token stay on the device.
* `prefill_many(prompts, ...)`      -> one `Prefix` per prompt for up to ``engine.prefill_batch`` prompts of one
                                      length bucket, run as one [rows, bucket] call (the same result per prompt as
                                      `prefill` one by one; each `Prefix` has a single prefill's shapes).
* `prefill_from_state(state, ...)`  -> the same `Prefix` for a prompt whose first blocks the ranker already ran
                                      when it scored the prompt: only the remaining blocks run.
* `set_shared_prefix(tokens)`      -> caches the K/V of a token prefix many prompts start with (the chat
                                      template's fixed header); a later prefill of a prompt that starts with it
                                      runs only the tokens after it, attending to the cached K/V.
* `insert(prefix, slot)`           -> writes the prefix's K/V into the slot (decode state donated, updated in place).
* `generate()`                     -> one decode step for every slot; returns the new token of each slot
                                      (one small device->host copy per step).
* `generate_with_pass(tokens, n)`  -> the same step, plus a waiting prompt's pass through the first n blocks in
                                      the same layer loop (sharing each block's weight reads): a ranker's pass
                                      for little more than its own arithmetic.
* `free(slot)`                     -> the slot stops decoding (its cache rows are simply overwritten later).
* `swap_out(slot)`                 -> a preempted slot's K/V, last token and sampling settings as a `Prefix` (a
                                      device-side copy), then `free(slot)`; `insert` of that prefix resumes the
                                      request exactly where it stopped, with no recompute.

The decode state (KV cache + per-slot last token, length and sampling settings) is a plain pytree that is donated
to each call. The cache's length axis is sized to a bucket just above the longest running sequence: it grows before
a step or insert that needs room and shrinks when long requests leave (one copy each time, amortised over many
steps), so a decode step reads only about as much cache as the real context, in place, and one compiled step exists
per bucket. The host keeps a mirror of per-slot lengths and activity, so scheduling never waits on the device.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ltr_jax.engine.sampling import sample_tokens
from ltr_jax.engine.settings import EngineConfig
from ltr_jax.engine.sharding import cache_sharding, replicated, shard_state
from ltr_jax.models import blockwise
from ltr_jax.models.config import LlamaConfig
from ltr_jax.models.llama import BackboneState, Llama

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SlotSampling:
    """Per-request sampling settings as the device sees them."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0


class Prefix(NamedTuple):
    """The result of a prefill (or of `Engine.swap_out`), still on the device."""

    kv: list  # per layer (k, v) [1, kv_heads, bucket, head_dim] (keys too: `insert` transposes them)
    length: jax.Array  # int32 scalar: tokens in the prefix
    token: jax.Array  # int32 scalar: the token sampled after the prefix
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array

    @property
    def nbytes(self) -> int:
        return sum(k.nbytes + v.nbytes for k, v in self.kv)


class DecodeState(NamedTuple):
    cache: list  # per layer (k [slots, kv_heads, head_dim, cache_len], v [slots, kv_heads, cache_len, head_dim])
    tokens: jax.Array  # int32 [slots]: last token of each slot (input of the next step)
    lengths: jax.Array  # int32 [slots]: tokens in each slot's cache = position of the next input token
    temperature: jax.Array  # float32 [slots]
    top_k: jax.Array  # int32 [slots]
    top_p: jax.Array  # float32 [slots]
    seed: jax.Array  # uint32 [slots]


class SharedPrefix(NamedTuple):
    """A token prefix whose K/V the engine keeps for every prompt that starts with it."""

    tokens: tuple[int, ...]
    kv: list  # per layer (k, v) [1, kv_heads, len(tokens), head_dim]

    @property
    def length(self) -> int:
        return len(self.tokens)


@dataclass
class EngineStats:
    prefill_calls: int = 0
    prefill_tokens: int = 0
    resumed_prefills: int = 0  # prefills that started from a ranker's backbone pass (counted in prefill_calls)
    shared_prefix_hits: int = 0  # prefills that started after the cached shared prefix (counted in prefill_calls)
    batched_prefills: int = 0  # prompts prefilled in a call with others (counted in prefill_calls)
    prefill_batches: int = 0  # those calls
    fused_passes: int = 0  # decode steps that also ran a prompt's backbone pass (counted in generate_calls)
    fused_variants_skipped: int = 0  # decode steps with a pass that warm-up left uncompiled (memory-map budget)
    generate_calls: int = 0


# --------------------------------------------------------------------------------------------- compiled pieces
def _joined_kv(past, kv):
    """Per layer, a cached prefix's (k, v) followed by the new tokens' (k, v) (``past`` empty: kv as is)."""
    if not past:
        return list(kv)
    return [(jnp.concatenate([pk, k.astype(pk.dtype)], axis=2), jnp.concatenate([pv, v.astype(pv.dtype)], axis=2))
            for (pk, pv), (k, v) in zip(past, kv)]


def _rows_end(past, x, kv, n_new):
    """The end of a prefill whose blocks ran (`blockwise.run_blocks`): x [R, T, D] after the last block, ``kv``
    every block's (k, v) [R, KV, T, hd] of rows of ``n_new`` [R] real tokens after the cached prefix ``past``
    (per-layer K/V; empty for none). Returns (each row's residual at its last position [R, D], each row's K/V
    after the prefix's, per layer [1, KV, P + T, hd]: a single prompt's `Prefix.kv`)."""
    last = jnp.take_along_axis(x, (n_new - 1)[:, None, None], axis=1)[:, 0]
    return last, tuple(_joined_kv(past, [(k[i:i + 1], v[i:i + 1]) for k, v in kv]) for i in range(x.shape[0]))


def _first_tokens_fn(graphdef, state, last, lengths, temperature, top_k, top_p, seed):
    """Each prefilled row's first token, from its last position's residual ``last`` [R, D] (``lengths`` [R]: its
    tokens, the shared prefix's included; per-row sampling settings [R]). Returns, per row, the `Prefix` fields
    after ``kv``. No input depends on the padded length, so one executable serves every prompt shape."""
    new = sample_tokens(nnx.merge(graphdef, state).logits(last), temperature, top_k, top_p, seed, lengths)
    return tuple((lengths[i], new[i], temperature[i], top_k[i], top_p[i], seed[i]) for i in range(last.shape[0]))


def _fit_length(x: jax.Array, axis: int, n: int) -> jax.Array:
    """Pad with zeros or cut ``x`` along ``axis`` to length ``n`` (callers only ever cut padding or dead rows)."""
    if x.shape[axis] >= n:
        return jax.lax.slice_in_dim(x, 0, n, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, n - x.shape[axis])
    return jnp.pad(x, pad)


def _rest_start_fn(bucket: int, dtype: str, hidden):
    """The residual stream [1, bucket, D] a prefill resumes from: the ranker's pass's hidden state [T, D]."""
    return _fit_length(hidden, 0, bucket)[None].astype(dtype)


def _rest_end_fn(past, x, upper, lower_kv, length):
    """`_rows_end` of a prefill whose first blocks the ranker's pass ran: their K/V ``lower_kv`` [N, 2, KV, T, hd]
    (padded to its own length), then the other blocks' ``upper``, for ``length`` [1] tokens after ``past``."""
    bucket, n_low = x.shape[1], lower_kv.shape[0]
    lower_kv = _fit_length(lower_kv, 3, bucket)
    lower = [(lower_kv[i, 0][None], lower_kv[i, 1][None]) for i in range(n_low)]
    return _rows_end(past, x, lower + list(upper), length)


def _insert_fn(prefix: Prefix, decode_state: DecodeState, slot):
    cache_len = decode_state.cache[0][1].shape[2]

    def fit(x):  # the prefix bucket may be longer than the cache; its real length is not (the engine grows first)
        return x[:, :, :cache_len]

    cache = [
        (jax.lax.dynamic_update_slice(kc, fit(pk).swapaxes(2, 3).astype(kc.dtype), (slot, 0, 0, 0)),
         jax.lax.dynamic_update_slice(vc, fit(pv).astype(vc.dtype), (slot, 0, 0, 0)))
        for (kc, vc), (pk, pv) in zip(decode_state.cache, prefix.kv)
    ]
    return DecodeState(
        cache=cache,
        tokens=decode_state.tokens.at[slot].set(prefix.token),
        lengths=decode_state.lengths.at[slot].set(prefix.length),
        temperature=decode_state.temperature.at[slot].set(prefix.temperature),
        top_k=decode_state.top_k.at[slot].set(prefix.top_k),
        top_p=decode_state.top_p.at[slot].set(prefix.top_p),
        seed=decode_state.seed.at[slot].set(prefix.seed),
    )


def _extract_fn(decode_state: DecodeState, slot, bucket: int) -> Prefix:
    """One slot as a `Prefix` of ``bucket`` cache rows: its K/V, length, pending token and sampling settings."""

    def rows(x):
        return _fit_length(jax.lax.dynamic_index_in_dim(x, slot, axis=0, keepdims=True), 2, bucket)

    d = decode_state
    return Prefix([(rows(k.swapaxes(2, 3)), rows(v)) for k, v in d.cache], d.lengths[slot], d.tokens[slot],
                  d.temperature[slot], d.top_k[slot], d.top_p[slot], d.seed[slot])


def _resize_fn(decode_state: DecodeState, cache_len: int):
    cache = [(_fit_length(k, 3, cache_len), _fit_length(v, 2, cache_len)) for k, v in decode_state.cache]
    return decode_state._replace(cache=cache)


def _next_tokens_fn(logits, tokens, lengths, temperature, top_k, top_p, seed, active):
    """Each active slot's next token from a decode step's logits [slots, V]: every slot's (last token, length)
    after the step, for the decode state, and the tokens again in a buffer of their own, for the host (the state's
    are donated to the next step, which may be dispatched before the host reads this one's). No input depends on
    the cache length, so one executable serves every decode shape."""
    new = jnp.where(active, sample_tokens(logits, temperature, top_k, top_p, seed, lengths + 1), tokens)
    return new, lengths + active.astype(lengths.dtype), new


def _generate_fn(graphdef, state, cache, tokens, lengths):
    """A decode step's forward pass: the logits [slots, V] of every slot's last token and the cache with its row."""
    logits, cache = nnx.merge(graphdef, state).decode(tokens, lengths, cache)
    return cache, logits


def _generate_pass_fn(graphdef, n_pass, state, cache, tokens, lengths, past, pass_tokens, pass_length):
    """A decode step's forward pass that also runs one prompt (``pass_length`` real tokens of ``pass_tokens`` [T],
    after the cached prefix ``past`` when given) through the first ``n_pass`` blocks. Returns the step's (cache,
    logits) and the prompt's hidden state [T, D] and K/V [n_pass, 2, KV, T, hd]: a ranker's backbone pass."""
    model = nnx.merge(graphdef, state)
    logits, cache, hidden, kvs = model.decode_with_pass(tokens, lengths, cache, pass_tokens[None], pass_length[None],
                                                        n_pass, list(past) or None)
    kv = jnp.stack([jnp.stack([k[0], v[0]]) for k, v in kvs])
    return cache, logits, hidden[0], kv


# Module-level compiled functions (the graph definition is a static argument), so every engine over the same model
# architecture shares one compilation cache.
# The prompt passes run their blocks one compiled block per call (`ltr_jax.models.blockwise`); these are their ends.
# Sampling is most of a prefill's end in compiled code, so it is an executable of its own, shared by every shape;
# so is a decode step's (`_NEXT_TOKENS`, after the step's forward pass of its cache length).
_PREFILL_END = jax.jit(_rows_end)
_REST_START = jax.jit(_rest_start_fn, static_argnums=(0, 1))
_REST_END = jax.jit(_rest_end_fn)
_FIRST_TOKENS = jax.jit(_first_tokens_fn, static_argnums=(0,))
_INSERT = jax.jit(_insert_fn, donate_argnums=(1,))
_GENERATE = jax.jit(_generate_fn, static_argnums=(0,), donate_argnums=(2,))
_GENERATE_PASS = jax.jit(_generate_pass_fn, static_argnums=(0, 1), donate_argnums=(3,))
_NEXT_TOKENS = jax.jit(_next_tokens_fn, donate_argnums=(1, 2))
_RESIZE = jax.jit(_resize_fn, static_argnames=("cache_len",))  # shapes change: nothing to donate
_EXTRACT = jax.jit(_extract_fn, static_argnames=("bucket",))  # reads the state: the next step still donates it
JITTED = (_PREFILL_END, _REST_START, _REST_END, _FIRST_TOKENS, _INSERT, _GENERATE, _GENERATE_PASS, _NEXT_TOKENS,
          _RESIZE, _EXTRACT, *blockwise.JITTED)


def _sampling_rows(samplings: list[SlotSampling]) -> tuple[np.ndarray, ...]:
    """Per-row sampling settings as the compiled prefills take them: temperature, top_k, top_p, seed [R]."""
    return (np.asarray([s.temperature for s in samplings], np.float32),
            np.asarray([s.top_k for s in samplings], np.int32),
            np.asarray([s.top_p for s in samplings], np.float32),
            np.asarray([s.seed & 0xFFFFFFFF for s in samplings], np.uint32))


class _CompileClock:
    """Seconds XLA has spent compiling in this process, summed from JAX's own compile-duration events."""

    def __init__(self):
        self.seconds = 0.0
        self._lock = threading.Lock()
        jax.monitoring.register_event_duration_secs_listener(self._record)

    def _record(self, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            with self._lock:
                self.seconds += duration


_COMPILE_CLOCK = _CompileClock()


class Engine:
    """Prefill / insert / generate over a fixed number of decode slots for one Llama-family model."""

    def __init__(self, model: Llama, config: EngineConfig, mesh: jax.sharding.Mesh | None = None):
        self.model_config: LlamaConfig = model.config
        self.config = config = config.for_backend(jax.default_backend())
        if config.max_seq_len > self.model_config.max_position_embeddings:
            raise ValueError(
                f"engine.max_seq_len={config.max_seq_len} exceeds the model's context "
                f"({self.model_config.max_position_embeddings}); lower engine.max_seq_len"
            )
        self.mesh = mesh
        self.graphdef, self.params = nnx.split(model)
        # Without a mesh every array the engine holds is committed to one device. A jit signature includes whether
        # each argument is committed, so warm-up (on the engine's own arrays) and serving (on arrays that may come
        # committed from elsewhere, e.g. a ranker restored by Orbax) must agree, or serving compiles mid-run.
        self.device = None if mesh is not None else jax.devices()[0]
        self._mesh_devices = set(mesh.devices.flat) if mesh is not None else set()
        if mesh is not None:
            self.params = shard_state(self.params, mesh)
        else:
            self.params = jax.device_put(self.params, self.device)
        self.stats = EngineStats()
        # the same arrays as params, as the blockwise prompt passes take them: one weights dict per block
        self.weights = Llama.state_params(self.params)
        self._inv_freq = nnx.to_pure_dict(self.params)["inv_freq"]
        self._first_tokens = functools.partial(_FIRST_TOKENS, self.graphdef)
        self._insert = _INSERT
        self._generate = functools.partial(_GENERATE, self.graphdef)
        self._generate_pass = functools.partial(_GENERATE_PASS, self.graphdef)
        self._resize = _RESIZE
        self._extract = _EXTRACT
        self.cache_len = config.cache_bucket(1)
        self.decode_state = self._init_decode_state()
        self.host_lengths = np.zeros(config.num_slots, np.int64)
        self.host_active = np.zeros(config.num_slots, bool)
        self.shared_prefix: SharedPrefix | None = None
        # (cache length, blocks, shared-prefix length, bucket) of each fused step compiled (by warm-up, or a call):
        # serving fuses a pass only into one of these, so a fused step never compiles mid-traffic
        self.fused_pass_shapes: set[tuple[int, int, int, int]] = set()
        self._compile_seconds_at_start = _COMPILE_CLOCK.seconds

    # ------------------------------------------------------------------------------------------------ setup
    def _init_decode_state(self) -> DecodeState:
        c, e = self.model_config, self.config
        v_shape = (e.num_slots, c.n_kv_heads, self.cache_len, c.head_dim)
        k_shape = (e.num_slots, c.n_kv_heads, c.head_dim, self.cache_len)
        dt = jnp.dtype(c.dtype)
        n = e.num_slots
        if self.mesh is not None:
            sharding = cache_sharding(self.mesh)
            zeros = {shape: jax.jit(lambda shape=shape: jnp.zeros(shape, dt), out_shardings=sharding)
                     for shape in (k_shape, v_shape)}
            cache = [(zeros[k_shape](), zeros[v_shape]()) for _ in range(c.n_layers)]
            return DecodeState(cache, jnp.zeros(n, jnp.int32), jnp.zeros(n, jnp.int32), jnp.zeros(n, jnp.float32),
                               jnp.zeros(n, jnp.int32), jnp.ones(n, jnp.float32), jnp.zeros(n, jnp.uint32))
        # One device: zeros made on the host and copied over (an eager jnp.zeros compiles, and keeps, an executable)
        cache = [(np.zeros(k_shape, dt), np.zeros(v_shape, dt)) for _ in range(c.n_layers)]
        return jax.device_put(DecodeState(cache, np.zeros(n, np.int32), np.zeros(n, np.int32),
                                          np.zeros(n, np.float32), np.zeros(n, np.int32), np.ones(n, np.float32),
                                          np.zeros(n, np.uint32)), self.device)

    def _commit(self, x: jax.Array) -> jax.Array:
        """``x`` committed to the engine's device, or on a mesh to all its devices (replicated, unless the engine
        made it there), with no copy when it already is: so its jit signature is the one warm-up compiled, whoever
        made it (a ranker's pass runs on one device)."""
        if self.mesh is None:
            return jax.device_put(x, self.device)
        on_mesh = isinstance(x, jax.Array) and x.sharding.device_set == self._mesh_devices
        return x if on_mesh else jax.device_put(x, replicated(self.mesh))

    @property
    def num_slots(self) -> int:
        return self.config.num_slots

    @property
    def num_devices(self) -> int:
        """Devices the model is split over (1 without a mesh)."""
        return 1 if self.mesh is None else self.mesh.size

    @property
    def max_seq_len(self) -> int:
        return self.config.max_seq_len

    def compiled_variants(self) -> int:
        """How many executables the engine's jitted functions hold (JAX's own cache count, shared by every engine in
        the process): unchanged over a stretch of serving means nothing compiled in it."""
        return sum(fn._cache_size() for fn in JITTED)

    @property
    def compile_seconds(self) -> float:
        """Seconds XLA spent compiling in this process since this engine was built (JAX's compile events)."""
        return _COMPILE_CLOCK.seconds - self._compile_seconds_at_start

    def cache_buckets(self, up_to: int | None = None) -> list[int]:
        """Every cache length the engine may use for sequences of up to `up_to` tokens (default: max_seq_len)."""
        top = self.config.cache_bucket(min(up_to or self.config.max_seq_len, self.config.max_seq_len))
        out, n = [], self.config.cache_bucket(1)
        while True:
            out.append(n)
            if n >= top:
                return out
            n = self.config.cache_bucket(n + 1)

    def warmup(self, prefill_buckets: list[int] | None = None, cache_lens: list[int] | None = None,
               transitions: bool = False, swap: bool = False) -> float:
        """Compile shapes ahead of traffic; returns seconds spent. Leaves no slot active.

        `prefill_buckets`: prompt buckets to compile (with a shared prefix cached, also every bucket up to the
        largest of them for the tokens after it); `cache_lens`: decode cache lengths; `transitions`: also every
        insert (prefill bucket x cache length) and cache resize between the given lengths, so a benchmark run
        meets no compilation at all; `swap`: also every `swap_out` from those cache lengths and the insert of
        each swapped-out prefix bucket (preemptions that keep their K/V)."""
        t0 = time.perf_counter()
        self.host_active[:] = False
        self.host_lengths[:] = 0
        prefill_buckets = prefill_buckets or []
        cache_lens = cache_lens or []
        prefixes = {b: self._prefill_new([0] * min(b, 2), 0, SlotSampling(), b) for b in prefill_buckets}
        groups = [(0, b) for b in prefill_buckets]
        shared = self.shared_prefix.length if self.shared_prefix is not None else 0
        if shared and prefill_buckets:  # after the shared prefix a prompt needs a smaller bucket, any of them up to
            # the largest given; their K/V rows are shared + bucket
            top = max(prefill_buckets)
            prefixes.update({shared + b: self._prefill_new([0] * min(b, 2), shared, SlotSampling(), b)
                             for b in self.config.prefill_buckets() if b <= top})
            groups += [(shared, b) for b in self.config.prefill_buckets() if b <= top]
        for rows in self.config.prefill_rows():  # batched prefills: their prefixes have the single ones' shapes
            for start, b in groups:
                self._prefill_rows([[0]] * rows, start, [SlotSampling()] * rows, b)
        if swap:  # a swapped-out slot of n cache rows holds < n tokens: its prefix is any bucket up to that
            for n in cache_lens:
                self.resize_cache(n)
                for b in self.swap_buckets(n):
                    prefix = self._extract(self.decode_state, np.int32(0), bucket=b)
                    prefixes.setdefault(b, prefix)
        for n in cache_lens:
            self.resize_cache(n)
            self._step(self.host_active.copy())
            if transitions:
                for b, prefix in prefixes.items():
                    self.decode_state = self._insert(prefix, self.decode_state,
                                                    np.int32(0))
                for m in cache_lens:
                    if m != n:
                        self._resize(self.decode_state, cache_len=m)
        for b, prefix in prefixes.items():  # the insert into the final cache length, at least
            self.decode_state = self._insert(prefix,
                                            self.decode_state, np.int32(0))
        self.fit_cache()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------------ API
    def set_shared_prefix(self, tokens: list[int] | tuple[int, ...] | None) -> int:
        """Cache the K/V of ``tokens``, a prefix many prompts start with (the chat template's fixed header, see
        `ChatTokenizer.shared_prefix_tokens`); None or empty turns the cache off. From then on `prefill` of any
        longer sequence that starts with these tokens runs only the rest, at positions after them, attending to
        the cached K/V: the same result as the whole prompt, for less compute. Returns the prefix length."""
        tokens = tuple(int(t) for t in tokens or ())
        self.shared_prefix = None
        if not tokens:
            return 0
        if len(tokens) >= self.config.max_seq_len - 1:
            raise ValueError(f"a shared prefix of {len(tokens)} tokens leaves no room in engine.max_seq_len="
                             f"{self.config.max_seq_len}; use a shorter prefix or none")
        vocab = self.model_config.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"shared prefix token ids must be in [0, {vocab})")
        prefix = self._prefill_new(list(tokens), 0, SlotSampling(), len(tokens))
        self.shared_prefix = SharedPrefix(tokens, prefix.kv)
        return len(tokens)

    def shared_prefix_len(self, tokens) -> int:
        """How many leading tokens of ``tokens`` the shared prefix cache covers: its length when ``tokens`` starts
        with it and goes on past it, else 0."""
        sp = self.shared_prefix
        if sp is None or len(tokens) <= sp.length:
            return 0
        head = tokens[: sp.length]
        return sp.length if tuple(int(t) for t in head) == sp.tokens else 0

    def prefill(self, tokens: list[int] | np.ndarray, sampling: SlotSampling, bucket: int | None = None) -> Prefix:
        """Run a prompt (or prompt + already generated tokens, for a resume). Returns the device-side Prefix.
        A prompt that starts with the shared prefix runs only its tokens after it (``bucket``: of those)."""
        start = self._count_prefill(tokens)
        return self._prefill_new(tokens[start:], start, sampling, bucket)

    def _count_prefill(self, tokens) -> int:
        """Check a sequence to prefill and count it; returns how many shared-prefix tokens it starts with."""
        n = len(tokens)
        if n < 1:
            raise ValueError("prefill needs at least one token")
        if n >= self.config.max_seq_len:
            raise ValueError(
                f"a sequence of {n} tokens does not fit engine.max_seq_len={self.config.max_seq_len} "
                "(one position is needed for the next token)"
            )
        start = self.shared_prefix_len(tokens)
        self.stats.prefill_calls += 1
        self.stats.prefill_tokens += n
        self.stats.shared_prefix_hits += bool(start)
        return start

    def prefill_group(self, tokens) -> tuple[int, int]:
        """(shared-prefix tokens ``tokens`` starts with, the prefill bucket of the rest): sequences with the same
        group can be prefilled together by `prefill_many`."""
        start = self.shared_prefix_len(tokens)
        return start, self.config.prefill_bucket(max(1, len(tokens) - start))

    def prefill_many(self, sequences: list, samplings: list[SlotSampling]) -> list[Prefix]:
        """Prefill up to ``engine.prefill_batch`` sequences of one `prefill_group` in one call of [rows, bucket]
        tokens (rows padded to a compiled count with one-token dummy rows). Each row is computed as `prefill`
        computes it alone, so each `Prefix` (same shapes as a single prefill's) yields the same tokens."""
        n = len(sequences)
        if n != len(samplings) or not 1 <= n <= self.config.prefill_batch:
            raise ValueError(f"prefill_many takes 1..{self.config.prefill_batch} (engine.prefill_batch) sequences, "
                             f"one sampling each; got {n} and {len(samplings)}")
        if n == 1:
            return [self.prefill(sequences[0], samplings[0])]
        groups = {self.prefill_group(t) for t in sequences}
        if len(groups) != 1:
            raise ValueError(f"prefill_many needs sequences of one prefill group (shared prefix, bucket); got "
                             f"{sorted(groups)}")
        (start, bucket), = groups
        for t in sequences:
            self._count_prefill(t)
        self.stats.batched_prefills += n
        self.stats.prefill_batches += 1
        rows = self.config.prefill_row_bucket(n)
        pad = rows - n  # dummy one-token rows complete the compiled row count; their results are dropped
        prefixes = self._prefill_rows([t[start:] for t in sequences] + [[0]] * pad, start,
                                      list(samplings) + [SlotSampling()] * pad, bucket)
        return list(prefixes[:n])

    def _prefill_rows(self, sequences, start: int, samplings: list[SlotSampling], bucket: int) -> tuple:
        """The batched prefill of ``sequences`` (each after the first ``start`` tokens, the shared prefix)."""
        padded = np.zeros((len(sequences), bucket), np.int32)
        for i, t in enumerate(sequences):
            padded[i, :len(t)] = np.asarray(t, np.int32)
        return self._prefill_tokens(padded, [len(t) for t in sequences], start, samplings)

    def _prefill_tokens(self, padded: np.ndarray, n_new: list[int], start: int, samplings: list[SlotSampling]
                        ) -> tuple[Prefix, ...]:
        """Rows ``padded`` [R, T] of ``n_new`` real tokens each, after the shared prefix when ``start``: embedded,
        run through every block one compiled block per call, then finished (a `Prefix` per row)."""
        past = self.shared_prefix.kv if start else ()
        n_new = np.asarray(n_new, np.int32)
        x = blockwise.embed(self.model_config, self.weights["embed"], padded)
        x, kv = blockwise.run_blocks(self.model_config, self.weights["layers"], self._inv_freq, x, n_new,
                                     list(past) or None)
        return self._finish(*_PREFILL_END(past, x, kv, n_new), n_new + start, samplings)

    def _finish(self, last, kv_rows, lengths: np.ndarray, samplings: list[SlotSampling]) -> tuple[Prefix, ...]:
        """One `Prefix` per prefilled row: its K/V and its first token, sampled from its last position's residual
        ``last`` [R, D] (``lengths``: each row's tokens, shared prefix included)."""
        fields = self._first_tokens(self.params, last, np.asarray(lengths, np.int32), *_sampling_rows(samplings))
        return tuple(Prefix(kv, *f) for kv, f in zip(kv_rows, fields))

    def _prefill_new(self, tokens, start: int, sampling: SlotSampling, bucket: int | None) -> Prefix:
        """The prefill of ``tokens`` after the first ``start`` tokens, which are the shared prefix (0: none)."""
        m = len(tokens)
        bucket = bucket or self.config.prefill_bucket(m)
        padded = np.zeros(bucket, np.int32)
        padded[:m] = np.asarray(tokens, np.int32)
        return self._prefill_tokens(padded[None], [m], start, [sampling])[0]

    def prefill_from_state(self, state, sampling: SlotSampling) -> Prefix:
        """Finish the prefill of a prompt whose first blocks the ranker already ran (`BackboneState`: hidden state
        and K/V of those blocks; when the ranker ran only the tokens after the shared prefix, its ``prefix_len``
        says so). Same result as `prefill` of the whole prompt, for the cost of the other blocks."""
        c = self.model_config
        n, layers = int(state.length), int(state.kv.shape[0])
        start = int(getattr(state, "prefix_len", 0))
        if start and (self.shared_prefix is None or self.shared_prefix.length != start):
            have = "none" if self.shared_prefix is None else f"{self.shared_prefix.length} tokens"
            raise ValueError(f"the backbone state continues a shared prefix of {start} tokens, but this engine caches "
                             f"{have}; give the engine and the ranker the same shared prefix")
        if not 1 <= n or start + n >= self.config.max_seq_len:
            raise ValueError(f"a backbone state of {start + n} tokens does not fit engine.max_seq_len="
                             f"{self.config.max_seq_len}")
        if (not 0 < layers <= c.n_layers or state.hidden.shape[-1] != c.dim
                or tuple(state.kv.shape[1:3]) != (2, c.n_kv_heads) or state.kv.shape[-1] != c.head_dim):
            raise ValueError(f"backbone state of shape hidden {tuple(state.hidden.shape)}, kv {tuple(state.kv.shape)} "
                             f"does not belong to {c.name} ({c.n_layers} layers, dim {c.dim}, {c.n_kv_heads} kv heads)")
        bucket = self.config.prefill_bucket(n)
        self.stats.prefill_calls += 1
        self.stats.resumed_prefills += 1
        self.stats.shared_prefix_hits += bool(start)
        self.stats.prefill_tokens += start + n
        past = self.shared_prefix.kv if start else ()
        x = _REST_START(bucket, str(jnp.dtype(c.dtype)), self._commit(state.hidden))
        x, upper = blockwise.run_blocks(c, self.weights["layers"][layers:], self._inv_freq, x,
                                        np.asarray([n], np.int32), list(past[layers:]) or None)
        n_new = np.asarray([n], np.int32)
        return self._finish(*_REST_END(past, x, upper, self._commit(state.kv), n_new), n_new + start, [sampling])[0]

    def warmup_prefill_from_state(self, n_layers: int, lengths: list[int], starts: list[int] | None = None) -> float:
        """Compile `prefill_from_state` for backbone states of ``n_layers`` blocks padded to each of ``lengths``,
        with and (when one is cached) after the shared prefix (``starts``: only those of these), and the inserts of
        the prefill buckets they map to; returns seconds spent."""
        c, t0 = self.model_config, time.perf_counter()
        dt = jnp.dtype(c.dtype)
        starts = [s for s in [0] + ([self.shared_prefix.length] if self.shared_prefix is not None else [])
                  if starts is None or s in starts]
        stats = dataclasses.replace(self.stats)
        for start in starts:
            for t in lengths:
                if start + t >= self.config.max_seq_len:
                    continue
                state = BackboneState(*jax.device_put((np.zeros((t, c.dim), dt),
                                                       np.zeros((n_layers, 2, c.n_kv_heads, t, c.head_dim), dt)),
                                                      self.device), t, start)
                prefix = self.prefill_from_state(state, SlotSampling())
                self.decode_state = self._insert(prefix, self.decode_state, np.int32(0))
        for name in ("prefill_calls", "resumed_prefills", "shared_prefix_hits", "prefill_tokens"):
            setattr(self.stats, name, getattr(stats, name))  # warm-up calls are not traffic
        return time.perf_counter() - t0

    def swap_buckets(self, cache_len: int) -> list[int]:
        """The prefix buckets `swap_out` may produce from a cache of ``cache_len`` rows."""
        top = self.config.prefill_bucket(max(1, min(cache_len, self.config.max_seq_len) - 1))
        return [b for b in self.config.prefill_buckets() if b <= top]

    def insert(self, prefix: Prefix, slot: int) -> None:
        """Place a prefix into decode slot `slot` and mark it active."""
        if not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")
        prefix = jax.tree.map(self._commit, prefix)
        length = int(prefix.length)
        self.host_lengths[slot] = length
        self.host_active[slot] = True
        self.fit_cache()
        self.decode_state = self._insert(prefix, self.decode_state, np.int32(slot))
        self.host_active[slot] = True

    def swap_out(self, slot: int) -> Prefix:
        """Copy an active slot's K/V, length, pending token and sampling settings into a `Prefix` and free the slot.
        `insert` of that prefix (into any slot, at any later cache length) resumes the request where it stopped:
        the same next token, nothing recomputed."""
        bucket = self._swap_bucket(slot)
        prefix = self._extract(self.decode_state, np.int32(slot), bucket=bucket)
        self.free(slot)
        return prefix

    def swap_out_nbytes(self, slot: int) -> int:
        """Bytes of K/V `swap_out(slot)` would hold (the slot's length padded to its prefix bucket)."""
        c = self.model_config
        per_token = 2 * c.n_layers * c.n_kv_heads * c.head_dim * self.decode_state.cache[0][0].dtype.itemsize
        return self._swap_bucket(slot) * per_token

    def _swap_bucket(self, slot: int) -> int:
        if not (0 <= slot < self.num_slots and self.host_active[slot]):
            raise ValueError(f"slot {slot} is not an active slot of this engine; only a running slot can be swapped "
                             "out")
        return self.config.prefill_bucket(int(self.host_lengths[slot]))

    def free(self, slot: int) -> None:
        self.host_active[slot] = False
        self.host_lengths[slot] = 0

    def slot_lengths(self) -> np.ndarray:
        """Tokens currently in each slot's cache (host mirror; no device sync)."""
        return self.host_lengths.copy()

    def resize_cache(self, cache_len: int) -> None:
        """Set the cache length axis to `cache_len` (copying the live prefix); normally done by `fit_cache`."""
        if cache_len != self.cache_len:
            self.decode_state = self._resize(self.decode_state, cache_len=cache_len)
            self.cache_len = cache_len

    def planned_cache_len(self) -> int:
        """The cache length the next step will use: grown to hold every active sequence plus its next token, shrunk
        (with hysteresis) when the longest sequence fits a bucket under half the current length."""
        longest = int(self.host_lengths[self.host_active].max()) if self.host_active.any() else 0
        need = self.config.cache_bucket(longest + 1)
        return need if need > self.cache_len or need * 2 <= self.cache_len else self.cache_len

    def fit_cache(self) -> None:
        """Resize the cache to `planned_cache_len`."""
        self.resize_cache(self.planned_cache_len())

    def generate(self) -> jax.Array:
        """One decode step for all active slots. Returns the device array of new tokens [slots] (int32)."""
        self.fit_cache()
        self.stats.generate_calls += 1
        tokens = self._step(self.host_active.copy())
        self.host_lengths += self.host_active
        return tokens

    def _step(self, active: np.ndarray, pass_args: tuple | None = None):
        """One decode step's forward pass (fused with a prompt's pass: ``pass_args`` = (n_layers, past, tokens,
        length)), then its sampling; returns the new tokens [slots] (and, fused, the pass's hidden state and
        K/V)."""
        d = self.decode_state
        if pass_args is None:
            cache, logits = self._generate(self.params, d.cache, d.tokens, d.lengths)
            rest = ()
        else:
            n_layers, *args = pass_args
            cache, logits, *rest = self._generate_pass(n_layers, self.params, d.cache, d.tokens, d.lengths, *args)
        tokens, lengths, out = _NEXT_TOKENS(logits, d.tokens, d.lengths, d.temperature, d.top_k, d.top_p, d.seed,
                                            active)
        self.decode_state = d._replace(cache=cache, tokens=tokens, lengths=lengths)
        return (out, *rest) if rest else out

    def pass_compiled(self, tokens, n_layers: int, bucket: int) -> bool:
        """Whether `generate_with_pass` of this prompt (its tokens after the shared prefix padded to ``bucket``) is
        compiled for the cache length the next step uses: serving fuses a pass only then, so it never compiles
        mid-traffic."""
        shape = (self.planned_cache_len(), n_layers, self.shared_prefix_len(tokens), bucket)
        return shape in self.fused_pass_shapes

    def can_run_pass(self, start: int, bucket: int) -> bool:
        """Whether a pass of ``bucket`` padded tokens after ``start`` shared-prefix tokens fits this engine (its
        shared prefix, when ``start`` > 0, and max_seq_len)."""
        prefix_ok = not start or (self.shared_prefix is not None and self.shared_prefix.length == start)
        return prefix_ok and start + bucket < self.config.max_seq_len

    def generate_with_pass(self, tokens, n_layers: int, bucket: int):
        """`generate`, and in the same compiled step the pass of prompt ``tokens`` (a waiting request's, not in a
        slot) through the first ``n_layers`` blocks: after the shared prefix when it starts with it, padded to
        ``bucket``. The prompt's rows share each of those blocks' weight reads with the decode rows, so a ranker
        whose backbone is these blocks scores it for far less than a pass of its own. Returns (new tokens [slots],
        the prompt's `BackboneState`), which `prefill_from_state` later finishes."""
        start = self.shared_prefix_len(tokens)
        m = len(tokens) - start
        if not 0 < n_layers <= self.model_config.n_layers:
            raise ValueError(f"n_layers={n_layers} must be in 1..{self.model_config.n_layers}")
        if not 1 <= m <= bucket or start + m >= self.config.max_seq_len:
            raise ValueError(f"a pass of {m} tokens after {start} shared ones does not fit bucket {bucket} and "
                             f"engine.max_seq_len={self.config.max_seq_len}")
        padded = np.zeros(bucket, np.int32)
        padded[:m] = np.asarray(tokens[start:], np.int32)
        self.fit_cache()
        self.stats.generate_calls += 1
        self.stats.fused_passes += 1
        past = self.shared_prefix.kv[:n_layers] if start else ()
        new, hidden, kv = self._step(self.host_active.copy(), (n_layers, past, padded, np.int32(m)))
        self.fused_pass_shapes.add((self.cache_len, n_layers, start, bucket))  # compiled now, if it was not
        self.host_lengths += self.host_active
        return new, BackboneState(hidden, kv, m, start)

    def warmup_generate_with_pass(self, n_layers: int, start: int, bucket: int, cache_len: int) -> float:
        """Compile `generate_with_pass` for a pass of ``n_layers`` blocks over ``bucket`` padded tokens after
        ``start`` shared-prefix tokens, at decode cache length ``cache_len``; returns seconds spent. Leaves no slot
        active and the cache at ``cache_len`` (call `fit_cache` when done warming)."""
        if not self.can_run_pass(start, bucket):
            raise ValueError(f"a pass of {bucket} tokens after {start} shared ones does not fit this engine")
        t0 = time.perf_counter()
        self.host_active[:] = False
        self.host_lengths[:] = 0
        self.resize_cache(cache_len)
        past = self.shared_prefix.kv[:n_layers] if start else ()
        self._step(self.host_active.copy(), (n_layers, past, np.zeros(bucket, np.int32), np.int32(1)))
        self.fused_pass_shapes.add((cache_len, n_layers, start, bucket))
        return time.perf_counter() - t0
