"""``model.dtype``: "auto" resolves per backend (float32 on this CPU), and a bfloat16 engine keeps bfloat16 weights
and KV cache while its logits and sampling stay float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ltr_jax.config import ServeConfig, describe_schema
from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.models.llama import Llama
from ltr_jax.models.loading import load_model, resolve_dtype


def test_auto_dtype_resolves_per_backend():
    assert ServeConfig().model.dtype == "auto"
    assert any(line.startswith("model.dtype (a string, default 'auto')") and "bfloat16 on a GPU/TPU" in line
               for line in describe_schema(ServeConfig))
    assert jax.default_backend() == "cpu" and resolve_dtype("auto") == "float32"
    assert resolve_dtype("bfloat16") == "bfloat16"
    assert load_model("tiny").config.dtype == "float32"


def test_a_bfloat16_engine_keeps_bf16_weights_and_cache_and_f32_logits():
    loaded = load_model("tiny", dtype="bfloat16", seed=2)
    model = Llama.from_params(loaded.config, loaded.params)
    assert model.layers[0].wqkv[...].dtype == jnp.bfloat16
    x, _ = model.hidden(jnp.asarray([[5, 6, 7]]), jnp.asarray([3]))
    assert model.logits(x).dtype == jnp.float32
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=128))
    prefix = engine.prefill([5, 6, 7, 8], SlotSampling())
    engine.insert(prefix, 0)
    tokens = [int(prefix.token)] + [int(np.asarray(engine.generate())[0]) for _ in range(5)]
    assert engine.decode_state.cache[0][0].dtype == jnp.bfloat16
    assert all(0 <= t < loaded.config.vocab_size for t in tokens)
    # the same greedy tokens as float32 for the first steps of this tiny model (bf16 rounding may part them later)
    f32 = Engine(Llama.from_params(loaded.config.replace(dtype="float32"), loaded.params),
                 EngineConfig(num_slots=2, max_seq_len=128))
    ref = f32.prefill([5, 6, 7, 8], SlotSampling())
    assert int(ref.token) == tokens[0]
