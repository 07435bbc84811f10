"""Prompt passes run one compiled block per call: one block executable per prompt shape, whatever the depth."""

import jax
import jax.numpy as jnp
import numpy as np
from conftest import lowerings
from flax import nnx

from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.models import blockwise
from ltr_jax.models.llama import Llama
from ltr_jax.models.ranker import RankerHead, RankerScorer, RankerSpec
from ltr_jax.models.tiny import tiny_model


def test_a_prompt_pass_compiles_one_block_per_prompt_shape_not_per_block_count():
    """A 6-block model: the ranker's pass over the first 2 blocks, the prefill that continues it over the other 4,
    and a whole prefill over all 6 of a prompt of the same padded length all run the same compiled block; a new
    padded length compiles one more block, and a prompt shape compiled once compiles nothing again. Shapes of
    their own (dim 48), so no earlier test has compiled them."""
    loaded = tiny_model(seed=11, n_layers=6, dim=48, n_heads=4, n_kv_heads=2, ffn_dim=88, vocab_size=101)
    engine = Engine(Llama.from_params(loaded.config, loaded.params), EngineConfig(num_slots=2, max_seq_len=128))
    spec = RankerSpec(model_name=loaded.config.name, model_dim=loaded.config.dim, n_layers=2, hidden_dims=(8,),
                      max_prompt_len=64)
    # the ranker's backbone is the engine's own arrays, as the server builds it
    ranker = RankerScorer(spec, RankerHead.for_spec(spec), loaded.config, Llama.state_params(engine.params),
                          max_batch=1)
    blocks = blockwise._block._cache_size

    def serve(prompt):
        _, _, (state,) = ranker.raw_with_state([prompt])
        resumed = engine.prefill_from_state(state, SlotSampling())
        full = engine.prefill(prompt, SlotSampling())
        assert int(resumed.token) == int(full.token)

    before = blocks()
    serve(list(range(1, 10)))  # padded to 16
    assert blocks() == before + 1
    serve(list(range(1, 21)))  # padded to 32
    assert blocks() == before + 2
    with lowerings() as compiled:
        serve(list(range(3, 14)))  # 16 again
    assert compiled == [] and blocks() == before + 2


def test_the_blockwise_pass_computes_what_the_unrolled_one_does():
    """`blockwise.run_blocks` against `Llama.hidden` compiled whole: the same hidden states and K/V (rounding)."""
    loaded = tiny_model(seed=2, n_layers=3)
    model = Llama.from_params(loaded.config, loaded.params)
    weights = Llama.state_params(nnx.split(model)[1])
    tokens = np.random.default_rng(0).integers(1, 200, size=(2, 16)).astype(np.int32)
    lengths = np.asarray([16, 9], np.int32)
    want_x, want_kv = jax.jit(lambda t, n: model.hidden(t, n))(tokens, lengths)
    x = blockwise.embed(loaded.config, weights["embed"], tokens)
    got_x, got_kv = blockwise.run_blocks(loaded.config, weights["layers"], blockwise.inv_freq_for(loaded.config), x,
                                         lengths)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(np.asarray(got_x)[i, :n], np.asarray(want_x)[i, :n], atol=1e-5)
    for (gk, gv), (wk, wv) in zip(got_kv, want_kv):
        np.testing.assert_allclose(np.asarray(gk), np.asarray(wk), atol=1e-5)
        np.testing.assert_allclose(np.asarray(gv), np.asarray(wv), atol=1e-5)
    assert jnp.asarray(got_x).shape == (2, 16, loaded.config.dim)

