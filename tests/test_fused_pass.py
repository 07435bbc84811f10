"""A waiting prompt's ranker pass run inside a decode step: the step's tokens, the pass and the score are those of
running them apart, and the orchestrator serves the same tokens with it."""

import mmap
import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import pytest

from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.engine.orchestrator import Orchestrator, SamplingParams
from ltr_jax.engine.ranking import make_ranking_stage, share_prefix, warmup_ranker
from ltr_jax.models.llama import Llama
from ltr_jax.models.ranker import RankerHead, RankerScorer, RankerSpec
from ltr_jax.models.tiny import tiny_model
from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.scheduler import Scheduler

HEADER = [5, 17, 200, 33, 9, 81, 12, 140, 7, 66, 250]


@pytest.fixture(scope="module")
def served():
    loaded = tiny_model(seed=5, n_layers=3)
    return loaded, Llama.from_params(loaded.config, loaded.params)


def make_scorer(loaded, n_layers=2):
    spec = RankerSpec(model_name=loaded.config.name, model_dim=loaded.config.dim, n_layers=n_layers,
                      pooling="mean+last", hidden_dims=(16,), max_prompt_len=64)
    return RankerScorer(spec, RankerHead.for_spec(spec, seed=2), loaded.config, loaded.params, max_batch=4)


def prompts(lengths, seed=0, header=HEADER):
    rng = np.random.default_rng(seed)
    return [header + rng.integers(1, 256, size=n).tolist() for n in lengths]


@pytest.mark.parametrize("with_prefix", [False, True])
def test_a_decode_step_with_a_pass_computes_both_as_if_apart(served, with_prefix):
    _, model = served
    rng, c = np.random.default_rng(1), model.config
    shapes = ((3, c.n_kv_heads, c.head_dim, 32), (3, c.n_kv_heads, 32, c.head_dim))  # three slots' k, v: noise
    cache = [tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32) for shape in shapes)
             for _ in range(c.n_layers)]
    tokens, positions = jnp.asarray([3, 7, 11]), jnp.asarray([4, 20, 9])
    (prompt,) = prompts([13], seed=2)
    start = len(HEADER) if with_prefix else 0
    past = model.hidden(jnp.asarray([HEADER]), jnp.asarray([start]))[1][:2] if with_prefix else None
    rest = prompt[start:]
    padded = jnp.asarray([rest + [0] * (24 - len(rest))])
    logits, new_cache = model.decode(tokens, positions, cache)
    hidden, kvs = model.run_blocks(model._embed(padded), jnp.asarray([len(rest)]), 0, 2, past)
    f_logits, f_cache, f_hidden, f_kvs = model.decode_with_pass(tokens, positions, cache, padded,
                                                                jnp.asarray([len(rest)]), 2, past)
    np.testing.assert_allclose(np.asarray(f_logits), np.asarray(logits), atol=3e-5)
    for (k, v), (fk, fv) in zip(new_cache, f_cache):
        np.testing.assert_allclose(np.asarray(fk), np.asarray(k), atol=3e-5)
        np.testing.assert_allclose(np.asarray(fv), np.asarray(v), atol=3e-5)
    n = len(rest)
    np.testing.assert_allclose(np.asarray(f_hidden)[:, :n], np.asarray(hidden)[:, :n], atol=3e-5)
    assert len(f_kvs) == 2
    for (k, v), (fk, fv) in zip(kvs, f_kvs):
        np.testing.assert_allclose(np.asarray(fk)[:, :, :n], np.asarray(k)[:, :, :n], atol=3e-5)


def test_engine_step_with_a_pass_gives_the_same_tokens_state_and_score(served):
    loaded, model = served
    scorer = make_scorer(loaded)
    plain = Engine(model, EngineConfig(num_slots=2, max_seq_len=128))
    fused = Engine(model, EngineConfig(num_slots=2, max_seq_len=128))
    share_prefix(HEADER, fused, scorer)
    running, waiting = prompts([9, 20], seed=3), prompts([1, 14], seed=4) + [[3] * 10]
    for engine in (plain, fused):
        for slot, p in enumerate(running):
            engine.insert(engine.prefill(p, SlotSampling(temperature=1.0, seed=slot)), slot)
    assert not fused.pass_compiled(waiting[0], 2, 16)
    for p in waiting:
        start = fused.shared_prefix_len(p)
        new, state = fused.generate_with_pass(p, 2, 16)
        assert fused.pass_compiled(p, 2, 16)
        assert np.asarray(new).tolist() == np.asarray(plain.generate()).tolist()
        assert state.prefix_len == start and state.length == len(p) - start
        score, _ = scorer.score_state(state)
        assert score == pytest.approx(float(scorer.score([p])[0]), abs=1e-4)
        whole = fused.prefill(p, SlotSampling(seed=9))
        resumed = fused.prefill_from_state(state, SlotSampling(seed=9))
        assert int(resumed.token) == int(whole.token) and int(resumed.length) == len(p)
    assert fused.stats.fused_passes == 3
    with pytest.raises(ValueError, match="does not fit bucket 16"):
        fused.generate_with_pass(prompts([30])[0], 2, 16)
    with pytest.raises(ValueError, match="cannot be scored by a ranker over 2"):
        scorer.score_state(state._replace(kv=state.kv[:1]))


def serve(loaded, model, fuse, compile_counts, warm_engine):
    scorer = make_scorer(loaded)
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    share_prefix(HEADER, engine, scorer)
    batch = prompts([7, 30, 12, 40, 3, 21, 9, 15], seed=8) + [[2] * 9]
    outputs = [12, 4, 30, 6, 3, 8, 5, 9, 7]
    cache_lens = warm_engine(engine, batch, outputs)
    warmup_ranker(engine, scorer, scorer.pass_lengths(batch), batch_sizes=(1, 2, 4),
                  fused_shapes=scorer.pass_shapes(batch) if fuse else (), cache_lens=cache_lens)
    before = compile_counts()
    orch = Orchestrator(engine, loaded.tokenizer, Scheduler(make_policy("ltr", max_preemptions=0), 2),
                        ranking=make_ranking_stage(engine, scorer, fuse_pass=fuse))
    got: dict[str, list[int]] = {}
    order: list[str] = []

    def on_event(ev):
        got.setdefault(ev.request_id, []).extend(ev.token_ids)
        if ev.finished:
            order.append(ev.request_id)

    for i in range(2):  # two long requests fill both slots; the rest arrive one per boundary while they run
        orch.submit(batch[i], SamplingParams(max_tokens=outputs[i], temperature=0.8, seed=i, ignore_eos=True),
                    on_event, request_id=f"r{i}")
    orch._boundary()
    for i in range(2, len(batch)):
        orch.submit(batch[i], SamplingParams(max_tokens=outputs[i], temperature=0.8, seed=i, ignore_eos=True),
                    on_event, request_id=f"r{i}")
        orch._boundary()
    orch.run_until_idle()
    assert [len(got[f"r{i}"]) for i in range(len(batch))] == outputs
    return got, order, orch.stats(), compile_counts() == before


def test_orchestrator_runs_waiting_passes_inside_decode_steps_and_serves_the_same(
        served, engine_compile_counts, warm_engine_for):
    loaded, model = served
    plain, plain_order, plain_stats, _ = serve(loaded, model, False, engine_compile_counts, warm_engine_for)
    fused, fused_order, stats, compiled_nothing = serve(loaded, model, True, engine_compile_counts, warm_engine_for)
    assert plain_stats["fused_ranker_passes"] == 0
    assert stats["fused_ranker_passes"] >= 3  # arrivals while both slots were busy
    assert stats["fused_ranker_passes"] + stats["ranker_requests"] == 9
    assert stats["reused_ranker_passes"] == 9 and stats["ranker_state_bytes"] == 0
    assert fused == plain  # per-request seeds: the same tokens whichever step ranked them
    assert fused_order == plain_order  # and the same schedule: a deferred pass delays no admission
    assert compiled_nothing


def test_fused_warmup_stops_within_the_memory_map_budget_most_common_shapes_first(served, monkeypatch, caplog):
    """Each compiled step holds memory mappings and a process past vm.max_map_count crashes on its next compile:
    warm-up stops before the budget, having compiled the most common pass shapes (serving fuses only compiled
    steps: see the test above)."""
    import ltr_jax.engine.ranking as ranking_module

    loaded, model = served
    scorer = make_scorer(loaded)
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    batch = prompts([20] * 3 + [5] * 2 + [40], seed=11, header=[])
    shapes = scorer.pass_shapes(batch)
    assert shapes == [(0, 32), (0, 16), (0, 64)]  # the most common first
    calls = iter(range(10_000))
    # a fake process: 200 mappings at first, 50 more at each look (so about 50 per compiled step), limit 1000
    monkeypatch.setattr(ranking_module, "memory_maps", lambda: (200 + 50 * next(calls), 1000))
    cache_lens = [64, 128]
    lengths = scorer.pass_lengths(batch)
    with caplog.at_level("WARNING"):
        warmup_ranker(engine, scorer, lengths, fused_shapes=shapes, cache_lens=cache_lens, map_budget=0.5)
    fused_keys = sorted(engine.fused_pass_shapes)
    # looks before step i: 200 + 100 i; the next step is judged at 50 more; 500 allowed: steps 0, 1, 2 compile
    assert fused_keys == [(64, 2, 0, 16), (64, 2, 0, 32), (128, 2, 0, 32)]
    assert engine.stats.fused_variants_skipped == 3
    assert "vm.max_map_count" in caplog.text and "ranker.fuse_max_len" in caplog.text
    with pytest.raises(ValueError, match="map_budget"):
        warmup_ranker(engine, scorer, lengths, fused_shapes=shapes, cache_lens=cache_lens, map_budget=0)


def test_memory_maps_counts_this_process_against_the_kernel_limit():
    from ltr_jax.machine import memory_maps

    if not sys.platform.startswith("linux"):  # no /proc: the fused warm-up then compiles without a budget
        assert memory_maps() is None
        return
    used, limit = memory_maps()
    with open("/proc/self/maps", "rb") as f:
        assert abs(used - sum(1 for _ in f)) < 50  # the same process, a moment apart
    assert 0 < used < limit
    with tempfile.TemporaryDirectory() as tmp:  # distinct files: their mappings can never merge
        files = [open(os.path.join(tmp, f"m{i}"), "w+b") for i in range(8)]  # noqa: SIM115 - closed below
        for f in files:
            f.write(b"\0" * mmap.PAGESIZE)
            f.flush()
        held = [mmap.mmap(f.fileno(), mmap.PAGESIZE) for f in files]
        assert memory_maps()[0] > used
        for m, f in zip(held, files):
            m.close()
            f.close()
    del held
