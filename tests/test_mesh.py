"""The engine on a device mesh from config (``engine.mesh.tensor_parallel``): the server split over three CPU devices
serves the same greedy tokens over HTTP as on one; a degree that does not divide the heads is refused at start-up
naming the valid ones; each weight carries its logical axes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import jax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from ltr_jax.config import ConfigError, EngineRunConfig, ServeConfig, describe_schema, load_config
from ltr_jax.engine.sharding import RULES, spec_of, valid_degrees
from ltr_jax.models.config import tiny_config
from ltr_jax.models.hf_checkpoint import save_hf_checkpoint
from ltr_jax.models.llama import AXES, K_CACHE_AXES, KV_CACHE_AXES, LOGICAL_AXES, Llama
from ltr_jax.models.tiny import tiny_model
from ltr_jax.server.inprocess import serve_in_thread
from ltr_jax.server.runtime import StartupError, build_runtime

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "serve_tiny.yaml"
PROMPTS = ["Hello there", "The capital of France is", "1 2 3 4", "def add(a, b):", "Once upon a time"]


def test_every_weight_declares_its_logical_axes():
    _, state = nnx.split(Llama(tiny_config(), nnx.Rngs(0)))
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    params = [v for v in variables if isinstance(v, nnx.Param)]
    assert len(params) == 2 + 6 * 2 + 1  # embed, final_norm, 6 per block, lm_head
    for v in params:
        axes = v.get_metadata()[AXES]
        assert len(axes) == v[...].ndim and set(axes) <= set(LOGICAL_AXES) | {None}
    specs = {spec_of(v.get_metadata()[AXES]) for v in params}
    # split: heads (wqkv by KV head, wo by query head), MLP width only
    assert specs == {P(None), P(None, None), P(None, "tp", None), P(None, None, "tp"), P("tp", None)}
    assert spec_of(KV_CACHE_AXES) == spec_of(K_CACHE_AXES) == P(None, "tp", None, None)
    assert set(RULES) <= set(LOGICAL_AXES)


def test_the_mesh_key_is_one_documented_config_key_of_every_command():
    lines = [line for line in describe_schema(ServeConfig) if line.startswith("engine.mesh.")]
    assert len(lines) == 1 and lines[0].startswith("engine.mesh.tensor_parallel (an integer, default 1)")
    assert EngineRunConfig().engine.mesh.tensor_parallel == 1  # bench and train.label read the same section
    assert load_config(None, ["engine.mesh.tensor_parallel=3"]).engine.mesh.tensor_parallel == 3
    with pytest.raises(ConfigError, match="engine.mesh.tensor_parallel = 0"):
        load_config(None, ["engine.mesh.tensor_parallel=0"])


def test_valid_degrees_are_the_common_divisors_of_the_split_axes():
    assert valid_degrees(tiny_config()) == [1, 2]  # 4 heads, 2 KV heads, ffn 128
    assert valid_degrees(tiny_config(n_heads=9, n_kv_heads=3, dim=576, ffn_dim=1536)) == [1, 3]  # SmolLM2's
    assert valid_degrees(tiny_config(n_heads=32, n_kv_heads=8, dim=4096, ffn_dim=14336)) == [1, 2, 4, 8]


def test_a_degree_that_does_not_divide_the_heads_is_refused_at_start_up():
    config = load_config(TINY_CONFIG, ["engine.mesh.tensor_parallel=3", "logging.level=WARNING"])
    with pytest.raises(StartupError, match=r"engine.mesh.tensor_parallel = 3 does not divide .*valid degrees: 1, 2"):
        build_runtime(config, warmup=False)
    config = load_config(TINY_CONFIG, ["engine.mesh.tensor_parallel=2", "logging.level=WARNING"])
    with pytest.raises(StartupError, match=r"tensor_parallel = 2 but only 1 cpu device"):
        build_runtime(config, warmup=False)


@pytest.fixture(scope="module")
def three_head_checkpoint(tmp_path_factory):
    """A tiny model whose query heads (6), KV heads (3) and MLP width (192) split over 3 devices."""
    loaded = tiny_model(seed=3, n_heads=6, n_kv_heads=3, dim=96, ffn_dim=192)
    path = tmp_path_factory.mktemp("tiny_tp3")
    save_hf_checkpoint(path, loaded.config, loaded.params, tokenizer=loaded.tokenizer)
    return path


def completions(url: str) -> list[str]:
    out = []
    for prompt in PROMPTS:
        body = {"model": "tiny-tp", "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        resp = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        choice = resp.json()
        assert choice["usage"]["completion_tokens"] == 16
        out.append(choice["choices"][0]["text"])
    return out


def test_server_on_three_devices_serves_the_same_greedy_tokens(three_head_checkpoint):
    sets = ["--set", f"model.source={three_head_checkpoint}", "--set", "model.name=tiny-tp",
            "--set", "engine.warmup_max_len=32", "--set", "logging.level=WARNING"]
    with serve_in_thread(load_config(TINY_CONFIG, sets[1::2])) as one:
        expected = completions(one.url)
        assert httpx.get(f"{one.url}/health", timeout=10).json()["devices"] == 1
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=3", "PYTHONPATH": str(REPO)}
    env.pop("LTR_JAX_API_KEY", None)
    proc = subprocess.Popen([sys.executable, "-m", "ltr_jax.serve", "--config", str(TINY_CONFIG),
                             "--set", "engine.mesh.tensor_parallel=3", "--set", "server.port=0", *sets],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
    try:
        ready = proc.stdout.readline()
        match = re.search(r"ready on (http://127\.0\.0\.1:\d+)", ready)
        assert match, ready + (proc.stderr.read() if proc.poll() is not None else "")
        url = match.group(1)
        assert httpx.get(f"{url}/health", timeout=10).json()["devices"] == 3
        assert completions(url) == expected
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_fused_projections_round_trip_and_keep_each_kv_group_together():
    """`fuse_layer` puts each KV head's query heads, key and value side by side (so splitting the KV-head axis gives
    every device whole groups) and `split_layer` undoes it exactly; a fused layer passes through unchanged."""
    import numpy as np

    from ltr_jax.models.llama import fuse_layer, init_random_params, split_layer

    c = tiny_config()
    layer = init_random_params(c)["layers"][0]
    fused = fuse_layer(c, layer)
    assert fused["wqkv"].shape == (c.dim, c.n_kv_heads, (c.q_per_kv + 2) * c.head_dim)
    hd, g = c.head_dim, c.q_per_kv
    for kv in range(c.n_kv_heads):  # query head h belongs to KV head h // q_per_kv (Hugging Face GQA)
        for j in range(g):
            h = kv * g + j
            np.testing.assert_array_equal(fused["wqkv"][:, kv, j * hd:(j + 1) * hd],
                                          layer["wq"][:, h * hd:(h + 1) * hd])
        np.testing.assert_array_equal(fused["wqkv"][:, kv, g * hd:(g + 1) * hd], layer["wk"][:, kv * hd:(kv + 1) * hd])
        np.testing.assert_array_equal(fused["wqkv"][:, kv, (g + 1) * hd:], layer["wv"][:, kv * hd:(kv + 1) * hd])
    back = split_layer(c, fused)
    assert set(back) == set(layer)
    for key in layer:
        np.testing.assert_array_equal(back[key], layer[key])
    assert all(fuse_layer(c, fused)[k] is fused[k] for k in fused)
