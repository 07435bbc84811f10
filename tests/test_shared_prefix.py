"""The shared-prefix cache: prompts that start with the chat template's fixed header run only what follows it, in
the model, the engine's prefill and the ranker's pass, with the results of running the whole prompt."""

import jax.numpy as jnp
import numpy as np
import pytest

from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.engine.orchestrator import Orchestrator, SamplingParams
from ltr_jax.engine.ranking import make_ranking_stage, share_prefix, shares_ranker_pass, warmup_ranker
from ltr_jax.models.llama import Llama
from ltr_jax.models.ranker import RankerHead, RankerScorer, RankerSpec
from ltr_jax.models.tiny import tiny_model
from ltr_jax.models.tokenizer import ChatTokenizer
from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.scheduler import Scheduler

HEADER = [5, 17, 200, 33, 9, 81, 12, 140, 7, 66, 250, 3, 19]  # 13 tokens


@pytest.fixture(scope="module")
def served():
    loaded = tiny_model(seed=5, n_layers=3)
    return loaded, Llama.from_params(loaded.config, loaded.params)


def make_scorer(loaded, n_layers=2, pooling="mean+last", max_prompt_len=64):
    spec = RankerSpec(model_name=loaded.config.name, model_dim=loaded.config.dim, n_layers=n_layers,
                      pooling=pooling, hidden_dims=(16,), max_prompt_len=max_prompt_len)
    return RankerScorer(spec, RankerHead.for_spec(spec, seed=1), loaded.config, loaded.params, max_batch=4)


def prompts(lengths, seed=0, header=HEADER):
    rng = np.random.default_rng(seed)
    return [header + rng.integers(1, 256, size=n).tolist() for n in lengths]


def test_blocks_after_a_cached_prefix_compute_what_the_whole_pass_does(served):
    _, model = served
    p, (full,) = len(HEADER), prompts([27])
    n = len(full)
    tokens = jnp.asarray([full + [0] * 5], jnp.int32)
    x_full, kv_full = model.hidden(tokens, jnp.asarray([n]))
    _, past = model.hidden(jnp.asarray([HEADER]), jnp.asarray([p]))
    rest = jnp.asarray([full[p:] + [0] * 5], jnp.int32)
    x_rest, kv_rest = model.hidden(rest, jnp.asarray([n - p]), past=past)
    np.testing.assert_allclose(np.asarray(x_rest)[0, : n - p], np.asarray(x_full)[0, p:n], atol=2e-5)
    for (fk, fv), (rk, rv) in zip(kv_full, kv_rest):
        np.testing.assert_allclose(np.asarray(rk)[:, :, : n - p], np.asarray(fk)[:, :, p:n], atol=2e-5)
        np.testing.assert_allclose(np.asarray(rv)[:, :, : n - p], np.asarray(fv)[:, :, p:n], atol=2e-5)
    with pytest.raises(ValueError, match="past holds K/V for 3 blocks but 2 blocks run"):
        model.run_blocks(x_rest, jnp.asarray([n - p]), 1, None, past)


def test_engine_prefill_after_the_shared_prefix_serves_the_same_tokens(served):
    _, model = served
    plain = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    cached = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    assert cached.set_shared_prefix(HEADER) == len(HEADER)
    batch = prompts([1, 19, 40], seed=3) + [list(HEADER), [4] + HEADER + [8, 9], HEADER[:5] + [1, 2]]
    for i, prompt in enumerate(batch):
        for temperature in (0.0, 1.0):
            sampling = SlotSampling(temperature=temperature, seed=11 + i)
            outs = []
            for engine in (plain, cached):
                prefix = engine.prefill(prompt, sampling)
                engine.insert(prefix, 1)
                outs.append([int(prefix.token)] + [int(engine.generate()[1]) for _ in range(6)])
                engine.free(1)
            assert outs[0] == outs[1], (i, temperature)
    # only the first three go past the header; the header alone and the others run whole
    assert cached.stats.shared_prefix_hits == 3 * 2
    assert cached.stats.prefill_tokens == plain.stats.prefill_tokens
    kv = cached.prefill(batch[1], SlotSampling()).kv
    assert kv[0][0].shape[2] == len(HEADER) + 32  # the shared rows, then the rest's own bucket (19 tokens)
    cached.warmup(prefill_buckets=[64], cache_lens=[64])  # a 64-bucket prompt may need any bucket after the header
    compiled = cached.compiled_variants()
    for rest in (16, 24, 32, 48, 64):  # a prompt of the header plus each bucket's worth of tokens compiles nothing
        cached.prefill(HEADER + [7] * rest, SlotSampling())
    cached.prefill([7] * 60, SlotSampling())  # nor one without the header, in the 64 bucket
    assert cached.compiled_variants() == compiled
    assert cached.set_shared_prefix(None) == 0 and cached.shared_prefix is None
    with pytest.raises(ValueError, match="leaves no room"):
        cached.set_shared_prefix(list(range(255)))
    with pytest.raises(ValueError, match="token ids must be in"):
        cached.set_shared_prefix([1, 10_000])


def test_ranker_scores_and_passes_after_the_shared_prefix_match_the_whole_prompt(served):
    loaded, model = served
    batch = prompts([1, 6, 20, 40], seed=5) + [list(HEADER), [9] * 30]
    whole, cached = make_scorer(loaded), make_scorer(loaded)  # mean+last pooling: both poolings at once
    cached.set_shared_prefix(HEADER)
    np.testing.assert_allclose(cached.score(batch), whole.score(batch), rtol=1e-4, atol=1e-5)
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    assert not shares_ranker_pass(engine, cached)  # its passes start after a prefix this engine does not cache
    _, _, states = cached.raw_with_state(batch)
    assert [s.prefix_len for s in states] == [len(HEADER)] * 4 + [0, 0]
    assert [s.length for s in states] == [1, 6, 20, 40, len(HEADER), 30]
    with pytest.raises(ValueError, match="this engine caches none"):
        engine.prefill_from_state(states[0], SlotSampling())
    engine.set_shared_prefix(HEADER)
    assert shares_ranker_pass(engine, cached)
    for prompt, state in zip(batch, states):
        sampling = SlotSampling(temperature=1.0, seed=3)
        full, resumed = engine.prefill(prompt, sampling), engine.prefill_from_state(state, sampling)
        assert int(resumed.token) == int(full.token) and int(resumed.length) == len(prompt)
        for (fk, fv), (rk, rv) in zip(full.kv, resumed.kv):
            assert rk.shape == fk.shape
            np.testing.assert_allclose(np.asarray(rk)[:, :, : len(prompt)], np.asarray(fk)[:, :, : len(prompt)],
                                       atol=2e-5)
    assert cached.pass_lengths(batch) == [16, 32, 64]  # after the header 1, 6 -> 16; 20 -> 32; 40 -> 64; whole: 13, 30
    with pytest.raises(ValueError, match="no room under the ranker's max_prompt_len"):
        make_scorer(loaded, max_prompt_len=8).set_shared_prefix(HEADER)


def serve(loaded, model, scorer, header, compile_counts, warm_engine=None):
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    share_prefix(header, engine, scorer)
    batch, outputs = prompts([7, 30, 12, 50, 3, 21], seed=8) + [[2] * 9], [9, 4, 30, 6, 3, 8, 5]
    if warm_engine is not None:
        warm_engine(engine, batch, outputs)
        warmup_ranker(engine, scorer, scorer.pass_lengths(batch), batch_sizes=(1, 2, 4))
    before = compile_counts()
    orch = Orchestrator(engine, loaded.tokenizer, Scheduler(make_policy("ltr"), 2),
                        ranking=make_ranking_stage(engine, scorer))
    got: dict[str, list[int]] = {}
    for i, (prompt, n) in enumerate(zip(batch, outputs)):
        orch.submit(prompt, SamplingParams(max_tokens=n, temperature=0.8, seed=i, ignore_eos=True),
                    lambda ev: got.setdefault(ev.request_id, []).extend(ev.token_ids), request_id=f"r{i}")
    orch.run_until_idle()
    assert [len(got[f"r{i}"]) for i in range(len(batch))] == outputs
    return got, engine.stats, compile_counts() == before


def test_orchestrator_serves_the_same_tokens_with_the_shared_prefix_and_compiles_nothing_after_warmup(
        served, engine_compile_counts, warm_engine_for):
    loaded, model = served
    plain, plain_stats, _ = serve(loaded, model, make_scorer(loaded), None, engine_compile_counts)
    cached, stats, compiled_nothing = serve(loaded, model, make_scorer(loaded), HEADER, engine_compile_counts,
                                            warm_engine_for)
    assert cached == plain
    assert plain_stats.shared_prefix_hits == 0
    assert stats.shared_prefix_hits == 6 and stats.resumed_prefills == 7  # every pass reused; 6 after the header
    assert compiled_nothing


def test_the_chat_templates_fixed_header_is_the_shared_prefix(tiny_bpe):
    meta, _ = tiny_bpe
    tok = ChatTokenizer.from_gguf_metadata(meta)
    header = tok.shared_prefix
    assert header
    for message in ("What is a cat?", "  spaces first", "7 dogs", "z"):
        ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": message}]))
        assert tuple(ids[: len(header)]) == header and len(ids) > len(header)
    text = tok.decode(header, skip_special_tokens=False)
    assert text.startswith("<|im_start|>") and "user" in text
    assert ChatTokenizer(tok.tokenizer, chat_template=None).shared_prefix == ()
