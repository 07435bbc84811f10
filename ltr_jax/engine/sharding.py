"""Tensor-parallel sharding of the model and KV cache over a `jax.sharding.Mesh`.

Owns the partition rules: attention projections and the KV cache are split over heads, the MLP over its hidden
width, embeddings and norms replicated. XLA's SPMD partitioner inserts the collectives, so the engine's compiled
functions run unchanged on one device, on several local devices, or on several hosts after
`jax.distributed.initialize()` (call `init_distributed()` first on each host).
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

AXIS = "tp"

# last path element of a parameter -> how it is split
_RULES = {
    "wq": P(None, AXIS), "wk": P(None, AXIS), "wv": P(None, AXIS), "wo": P(AXIS, None),
    "w_gate": P(None, AXIS), "w_up": P(None, AXIS), "w_down": P(AXIS, None),
}


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D tensor-parallel mesh over the first `num_devices` devices (all, by default; across hosts too)."""
    devices = jax.devices()
    n = num_devices or len(devices)
    if n > len(devices):
        raise ValueError(f"asked for {n} devices but only {len(devices)} are visible ({jax.default_backend()})")
    return Mesh(np.array(devices[:n]), (AXIS,))


def check_divisible(model_config, mesh: Mesh) -> None:
    n = mesh.shape[AXIS]
    for name, value in (("n_kv_heads", model_config.n_kv_heads), ("n_heads", model_config.n_heads),
                        ("ffn_dim", model_config.ffn_dim)):
        if value % n:
            raise ValueError(f"cannot shard {model_config.name} over {n} devices: {name}={value} is not divisible "
                             f"by {n}; use a device count that divides it")


def param_spec(path: tuple) -> P:
    names = [getattr(k, "key", getattr(k, "name", k)) for k in path]
    names = [n for n in names if n != "value"]
    return _RULES.get(str(names[-1]), P()) if names else P()


def shard_params(params, mesh: Mesh):
    """Place an nnx.State (or any pytree of arrays) on the mesh according to the rules above."""
    def place(path, x):
        return jax.device_put(x, NamedSharding(mesh, param_spec(path)))

    return jax.tree_util.tree_map_with_path(place, params)


def cache_sharding(mesh: Mesh) -> NamedSharding:
    """KV cache [slots, kv_heads, cache_len, head_dim]: split over kv heads."""
    return NamedSharding(mesh, P(None, AXIS, None, None))


def init_distributed() -> None:
    """Join a multi-host job when the standard coordinator variables are set (no-op on one host)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
