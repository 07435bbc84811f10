"""The ranker's pass over a prompt reused as the start of its prefill: same tokens, less compute, bounded memory."""

import jax.numpy as jnp
import numpy as np
import pytest

from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.engine.orchestrator import Orchestrator, SamplingParams
from ltr_jax.engine.ranking import make_ranking_stage, shares_ranker_pass, warmup_ranker
from ltr_jax.models.llama import Llama
from ltr_jax.models.ranker import BackboneState, RankerHead, RankerScorer, RankerSpec
from ltr_jax.models.tiny import tiny_model
from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.scheduler import Scheduler


@pytest.fixture(scope="module")
def served():
    loaded = tiny_model(seed=5, n_layers=3)
    return loaded, Llama.from_params(loaded.config, loaded.params)


def make_scorer(loaded, n_layers=2, max_prompt_len=64, seed=0):
    spec = RankerSpec(model_name=loaded.config.name, model_dim=loaded.config.dim, n_layers=n_layers,
                      hidden_dims=(16,), max_prompt_len=max_prompt_len)
    return RankerScorer(spec, RankerHead.for_spec(spec, seed=seed), loaded.config, loaded.params, max_batch=4)


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, size=n).tolist() for n in lengths]


def test_prefill_from_the_rankers_pass_equals_a_full_prefill(served):
    loaded, model = served
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    scorer = make_scorer(loaded)
    lengths = [1, 5, 16, 20, 33, 48, 64]  # ladder paddings 16, 32, 64, the prefill buckets too
    prompts = prompts_of(lengths)
    scores, _, states = scorer.raw_with_state(prompts)
    np.testing.assert_allclose(scores, scorer.score(prompts), rtol=1e-5, atol=1e-6)
    for prompt, state in zip(prompts, states):
        assert isinstance(state, BackboneState) and state.length == len(prompt) and state.n_layers == 2
        for temperature, seed in ((0.0, 0), (1.0, 7), (1.0, 8)):
            sampling = SlotSampling(temperature=temperature, seed=seed)
            full = engine.prefill(prompt, sampling)
            resumed = engine.prefill_from_state(state, sampling)
            assert int(resumed.token) == int(full.token)
            assert len(resumed.kv) == loaded.config.n_layers
            n = len(prompt)
            for (fk, fv), (rk, rv) in zip(full.kv, resumed.kv):
                assert rk.shape == fk.shape  # the same prefill bucket: inserts need nothing new
                np.testing.assert_allclose(np.asarray(rk)[:, :, :n], np.asarray(fk)[:, :, :n], atol=1e-5)
                np.testing.assert_allclose(np.asarray(rv)[:, :, :n], np.asarray(fv)[:, :, :n], atol=1e-5)
    assert engine.stats.resumed_prefills == 3 * len(prompts)


def test_truncated_prompts_keep_no_state_and_foreign_states_are_refused(served):
    loaded, model = served
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    scorer = make_scorer(loaded, max_prompt_len=32)
    _, _, states = scorer.raw_with_state(prompts_of([10, 40]))
    assert states[0] is not None and states[1] is None  # the ranker saw a cut prompt: not the prefill's start
    other = tiny_model(seed=1, n_layers=3, dim=32, n_heads=2, n_kv_heads=1)
    foreign = make_scorer(other).raw_with_state(prompts_of([10]))[2][0]
    with pytest.raises(ValueError, match="does not belong to"):
        engine.prefill_from_state(foreign, SlotSampling())


def test_the_pass_is_shared_only_with_the_model_it_came_from(served):
    loaded, model = served
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    assert shares_ranker_pass(engine, make_scorer(loaded))
    assert shares_ranker_pass(engine, make_scorer(loaded, n_layers=3))
    same_shape_other_weights = tiny_model(seed=6, n_layers=3)
    assert not shares_ranker_pass(engine, make_scorer(same_shape_other_weights))
    assert not shares_ranker_pass(engine, object())  # a ranker without backbone states
    from ltr_jax.engine.sharding import make_mesh

    on_mesh = Engine(model, EngineConfig(num_slots=2, max_seq_len=256), mesh=make_mesh(1))
    assert shares_ranker_pass(on_mesh, make_scorer(loaded))  # the engine places the pass on its mesh


def run_requests(loaded, model, scorer, lengths, reuse=True, budget_mb=1024.0, slots=2):
    engine = Engine(model, EngineConfig(num_slots=slots, max_seq_len=256))
    orch = Orchestrator(engine, loaded.tokenizer, Scheduler(make_policy("ltr"), slots),
                        ranking=make_ranking_stage(engine, scorer, reuse_pass=reuse, state_budget_mb=budget_mb))
    got: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts_of([7, 30, 12, 50, 3, 21], seed=2)):
        sp = SamplingParams(max_tokens=lengths[i], temperature=0.9, seed=40 + i, ignore_eos=True)
        orch.submit(prompt, sp, lambda ev: got.setdefault(ev.request_id, []).extend(ev.token_ids),
                    request_id=f"r{i}")
    orch.run_until_idle()
    return got, orch.stats(), engine.stats


def test_orchestrator_serves_the_same_tokens_from_the_rankers_pass(served):
    loaded, model = served
    scorer = make_scorer(loaded)
    lengths = [9, 4, 12, 6, 3, 8]
    plain, plain_stats, _ = run_requests(loaded, model, scorer, lengths, reuse=False)
    shared, stats, engine_stats = run_requests(loaded, model, scorer, lengths)
    assert plain_stats["reused_ranker_passes"] == 0
    assert stats["reused_ranker_passes"] == len(lengths) == engine_stats.resumed_prefills
    assert stats["ranker_state_bytes"] == 0  # every kept pass was used or released
    assert shared == plain
    assert [len(shared[f"r{i}"]) for i in range(len(lengths))] == lengths
    # no memory for kept passes: every request prefills in full, still the same tokens
    starved, starved_stats, _ = run_requests(loaded, model, scorer, lengths, budget_mb=0.0)
    assert starved_stats["reused_ranker_passes"] == 0
    assert starved_stats["ranker_states_dropped"] == len(lengths)
    assert starved == plain


def test_over_budget_the_last_ranked_requests_drop_their_pass_first(served):
    loaded, model = served
    scorer = make_scorer(loaded, seed=3)
    engine = Engine(model, EngineConfig(num_slots=1, max_seq_len=256))
    prompts = prompts_of([20] * 6, seed=4)  # one padded length: every state has the same size
    size = scorer.raw_with_state(prompts[:1])[2][0].nbytes
    orch = Orchestrator(engine, loaded.tokenizer, Scheduler(make_policy("ltr"), 1),
                        ranking=make_ranking_stage(engine, scorer, state_budget_mb=2.5 * size / 2**20))
    for i, p in enumerate(prompts):
        orch.submit(p, SamplingParams(max_tokens=2, ignore_eos=True), lambda ev: None, request_id=f"r{i}")
    orch._take_inbox()
    jobs = sorted(orch._jobs.values(), key=lambda j: -j.request.score)
    assert [orch.ranking.keeps_pass(j.request) for j in jobs] == [True, True, False, False, False, False]
    assert orch.stats()["ranker_state_bytes"] == 2 * size
    assert orch.stats()["ranker_states_dropped"] == 4
    orch.run_until_idle()
    assert orch.stats()["reused_ranker_passes"] == 2 and orch.stats()["ranker_state_bytes"] == 0


def test_warmup_compiles_the_resumed_prefill(served):
    loaded, model = served
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    scorer = make_scorer(loaded)
    warmup_ranker(engine, scorer, [16, 32], batch_sizes=(1,))
    assert engine.stats.prefill_calls == engine.stats.resumed_prefills == 0
    compiled, c, layers = engine.compiled_variants(), engine.model_config, scorer.spec.n_layers
    for t in (16, 32):  # a resumed prefill of either warmed length compiles nothing
        state = BackboneState(jnp.zeros((t, c.dim)), jnp.zeros((layers, 2, c.n_kv_heads, t, c.head_dim)), t - 3, 0)
        engine.prefill_from_state(state, SlotSampling())
    assert engine.compiled_variants() == compiled


def test_after_warmup_serving_compiles_nothing_with_a_restored_ranker(served, tmp_path, engine_compile_counts,
                                                                      warm_engine_for):
    """A ranker restored from its checkpoint holds committed arrays, so its passes reach the engine committed; a
    jit signature includes commitment, so unless the engine commits everything alike, the warmed-up shapes are
    compiled again mid-traffic (seconds of stall per shape on a CPU)."""
    from ltr_jax.models.ranker import length_bucket
    from ltr_jax.models.ranker_checkpoint import load_scorer, save_ranker

    loaded, model = served
    fresh = make_scorer(loaded)
    scorer = load_scorer(save_ranker(tmp_path / "ranker", fresh.head, fresh.spec), model=loaded, max_batch=4)
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    prompts, outputs = prompts_of([7, 30, 12, 50, 3, 21, 40, 9], seed=8), [9, 4, 30, 6, 3, 8, 12, 20]
    warm_engine_for(engine, prompts, outputs)
    warmup_ranker(engine, scorer, sorted({length_bucket(len(p), 64, scorer.min_bucket) for p in prompts}),
                  batch_sizes=(1, 2, 4))
    before = engine_compile_counts()
    orch = Orchestrator(engine, loaded.tokenizer, Scheduler(make_policy("ltr"), 2),
                        ranking=make_ranking_stage(engine, scorer))
    got: dict[str, list[int]] = {}
    for i, (prompt, n) in enumerate(zip(prompts, outputs)):
        orch.submit(prompt, SamplingParams(max_tokens=n, ignore_eos=True),
                    lambda ev: got.setdefault(ev.request_id, []).extend(ev.token_ids), request_id=f"r{i}")
    orch.run_until_idle()
    assert orch.stats()["reused_ranker_passes"] == len(prompts)
    assert [len(got[f"r{i}"]) for i in range(len(prompts))] == outputs
    assert engine_compile_counts() == before
