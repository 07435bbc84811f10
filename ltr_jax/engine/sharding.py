"""The device mesh the engine runs on, built from ``engine.mesh``, and where each array goes on it.

The model declares each weight's logical axes where it creates it (`ltr_jax.models.llama`: ``logical_axes`` on
every `nnx.Param`, `KV_CACHE_AXES` for the cache); this module owns the one map from logical axes to mesh axes:
query/KV heads and the MLP width are split over the tensor-parallel axis ``tp``, everything else (vocabulary, model
width, norms) is replicated, and the KV cache is split over KV heads. XLA's SPMD partitioner inserts the
collectives, so the engine's compiled functions run unchanged on one device, several local devices, or several
hosts once `init_distributed()` has joined them.

`mesh_for(config, model_config)` is what the commands call: None for one device, else a mesh of
``tensor_parallel`` devices, refused with the valid degrees when that does not divide the model's heads.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ltr_jax.engine.settings import MeshConfig
from ltr_jax.models.config import LlamaConfig
from ltr_jax.models.llama import AXES, K_CACHE_AXES, KV_CACHE_AXES

AXIS = "tp"

# logical axis -> mesh axis (absent: replicated)
RULES = {"q_heads": AXIS, "kv_heads": AXIS, "ffn": AXIS}


def spec_of(logical_axes: tuple[str | None, ...] | None) -> P:
    """The `PartitionSpec` of an array with these logical axes (None: replicated)."""
    if not logical_axes:
        return P()
    return P(*(RULES.get(a) if a is not None else None for a in logical_axes))


def valid_degrees(model_config: LlamaConfig) -> list[int]:
    """Tensor-parallel degrees this model can be split over: the common divisors of its query heads, KV heads and
    MLP width."""
    c = model_config
    g = np.gcd.reduce([c.n_heads, c.n_kv_heads, c.ffn_dim])
    return [d for d in range(1, int(g) + 1) if g % d == 0]


def check_divisible(model_config: LlamaConfig, degree: int) -> None:
    """Raise ValueError naming the valid degrees when ``degree`` does not divide the model's split axes."""
    if degree not in valid_degrees(model_config):
        c = model_config
        raise ValueError(
            f"engine.mesh.tensor_parallel = {degree} does not divide {c.name}'s n_heads={c.n_heads}, "
            f"n_kv_heads={c.n_kv_heads} and ffn_dim={c.ffn_dim}; valid degrees: "
            + ", ".join(map(str, valid_degrees(c))))


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D tensor-parallel mesh over the first `num_devices` devices (all, by default; across hosts too)."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"engine.mesh.tensor_parallel = {n} but only {len(devices)} {jax.default_backend()} "
                         f"device(s) are visible")
    return Mesh(np.array(devices[:n]), (AXIS,))


def mesh_for(config: MeshConfig, model_config: LlamaConfig) -> Mesh | None:
    """The engine's mesh for ``engine.mesh`` (None: one device, no mesh). Joins a multi-host job first."""
    init_distributed()
    check_divisible(model_config, config.tensor_parallel)
    if config.tensor_parallel == 1 and jax.process_count() == 1:
        return None
    return make_mesh(config.tensor_parallel)


def shard_state(state, mesh: Mesh):
    """Place a model's `nnx.State` on the mesh, each variable by its declared logical axes."""
    def place(v):
        spec = spec_of(v.get_metadata().get(AXES))
        return v.replace(jax.device_put(v[...], NamedSharding(mesh, spec)))

    return jax.tree.map(place, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """The decode KV cache's placement: split over KV heads (`KV_CACHE_AXES`; keys' `K_CACHE_AXES` differ only in
    axes no mesh splits, so one placement serves both)."""
    assert spec_of(K_CACHE_AXES) == spec_of(KV_CACHE_AXES)
    return NamedSharding(mesh, spec_of(KV_CACHE_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


_JOINED = False


def init_distributed() -> bool:
    """Join a multi-host job when ``JAX_COORDINATOR_ADDRESS`` is set (with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID``, or a cluster JAX detects itself); a no-op on one host and on a second call. Must run before
    anything touches a device. True when this process is part of a multi-host job."""
    global _JOINED
    address = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and not _JOINED:
        n, rank = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
        jax.distributed.initialize(address, int(n) if n else None, int(rank) if rank else None)
        _JOINED = True
    return _JOINED
