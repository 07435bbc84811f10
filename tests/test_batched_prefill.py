"""Batched prefill (``engine.prefill_batch``): admitted prompts of one length bucket run as one [rows, bucket] call,
giving exactly the tokens one-by-one prefills give, with the scheduler still choosing who is admitted."""

from __future__ import annotations

import numpy as np
import pytest

from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.engine.orchestrator import Orchestrator, SamplingParams
from ltr_jax.models.llama import Llama
from ltr_jax.models.tiny import tiny_model
from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.scheduler import Scheduler


@pytest.fixture(scope="module")
def tiny():
    loaded = tiny_model(seed=4)
    return loaded, Llama.from_params(loaded.config, loaded.params)


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 256, size=n).tolist() for n in lengths]


SAMPLINGS = [SlotSampling(), SlotSampling(temperature=1.0, seed=3), SlotSampling(temperature=0.7, top_k=5, seed=9)]


@pytest.mark.parametrize("shared", [False, True])
def test_prefill_many_equals_prefill_one_by_one(tiny, shared):
    _, model = tiny
    engine = Engine(model, EngineConfig(num_slots=4, max_seq_len=256, prefill_batch=4))
    head = [7, 8, 9, 10, 11]
    if shared:
        engine.set_shared_prefix(head)
    prompts = [head + p for p in prompts_of([17, 18, 19])]  # one bucket (24) after the prefix or not
    assert len({engine.prefill_group(p) for p in prompts}) == 1
    many = engine.prefill_many(prompts, SAMPLINGS)
    assert engine.stats.prefill_batches == 1 and engine.stats.batched_prefills == 3
    for prompt, sampling, got in zip(prompts, SAMPLINGS, many):
        one = engine.prefill(prompt, sampling)
        assert int(got.token) == int(one.token) and int(got.length) == int(one.length) == len(prompt)
        for (gk, gv), (ok, ov) in zip(got.kv, one.kv):
            assert gk.shape == ok.shape and gk.dtype == ok.dtype  # the inserts compiled for one prompt take it
            np.testing.assert_allclose(np.asarray(gk), np.asarray(ok), atol=1e-5)
            np.testing.assert_allclose(np.asarray(gv), np.asarray(ov), atol=1e-5)
    assert engine.stats.shared_prefix_hits == (6 if shared else 0)
    with pytest.raises(ValueError, match="one prefill group"):
        engine.prefill_many(prompts_of([10, 40]), SAMPLINGS[:2])
    with pytest.raises(ValueError, match="engine.prefill_batch"):
        engine.prefill_many(prompts_of([10] * 5), [SlotSampling()] * 5)


def serve(loaded, model, prefill_batch, compile_counts=None, warm=None):
    """A burst of 9 prompts over 4 slots (so a boundary admits up to 4 at once, and later ones wait for slots),
    greedy and sampled; returns each request's tokens, the admission order and the engine's stats."""
    engine = Engine(model, EngineConfig(num_slots=4, max_seq_len=256, prefill_batch=prefill_batch))
    prompts = prompts_of([20, 18, 3, 22, 17, 40, 19, 5, 21], seed=1)
    outputs = [6, 9, 4, 7, 5, 8, 3, 6, 5]
    before = None
    if warm is not None:
        warm(engine, prompts, outputs)
        before = compile_counts()
    sched = Scheduler(make_policy("fcfs"), 4)
    orch = Orchestrator(engine, loaded.tokenizer, sched)
    got: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        sp = SamplingParams(max_tokens=outputs[i], temperature=0.0 if i % 2 else 0.8, seed=50 + i, ignore_eos=True)
        orch.submit(prompt, sp, lambda ev: got.setdefault(ev.request_id, []).extend(ev.token_ids),
                    request_id=f"r{i}")
    orch.run_until_idle()
    compiled_nothing = before is None or compile_counts() == before
    return got, engine.stats, compiled_nothing


def test_orchestrator_prefills_a_burst_together_with_the_same_tokens(tiny, engine_compile_counts, warm_engine_for):
    loaded, model = tiny
    alone, alone_stats, _ = serve(loaded, model, 1)
    together, stats, compiled_nothing = serve(loaded, model, 4, engine_compile_counts, warm_engine_for)
    assert together == alone
    assert [len(together[f"r{i}"]) for i in range(9)] == [6, 9, 4, 7, 5, 8, 3, 6, 5]
    assert alone_stats.prefill_batches == 0
    # the first boundary admits r0, r1, r3 (bucket 24) together, r2 alone (bucket 16): at least that one batch
    assert stats.prefill_batches >= 1 and stats.batched_prefills >= 3
    assert stats.prefill_calls == alone_stats.prefill_calls == 9
    assert compiled_nothing  # warm-up compiled the batched prefills; their prefixes reuse the single inserts
