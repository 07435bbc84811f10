"""Engine and orchestrator behaviour on a tiny random model: continuous batching, evict/resume, sampling, limits."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from conftest import lowerings, wait_for

from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.engine.orchestrator import Orchestrator, SamplingParams
from ltr_jax.engine.ranking import NoRanking
from ltr_jax.engine.sampling import _filter_top_k_top_p, sample_tokens
from ltr_jax.models.llama import Llama
from ltr_jax.models.tiny import tiny_model
from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.scheduler import Scheduler


@pytest.fixture(scope="module")
def tiny():
    loaded = tiny_model(seed=3)
    return loaded, Llama.from_params(loaded.config, loaded.params)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(3, 40))).tolist() for _ in range(n)]


def _run_alone(model, prompt, n_tokens, sampling=None, slots=4, slot=2):
    engine = Engine(model, EngineConfig(num_slots=slots, max_seq_len=256))
    prefix = engine.prefill(prompt, sampling or SlotSampling())
    engine.insert(prefix, slot)
    out = [int(prefix.token)]
    while len(out) < n_tokens:
        out.append(int(engine.generate()[slot]))
    return out


def test_continuous_batching_matches_solo_runs_including_evict_and_resume(tiny):
    _, model = tiny
    prompts = _prompts(3)
    n = 24
    alone = [_run_alone(model, p, n) for p in prompts]
    engine = Engine(model, EngineConfig(num_slots=4, max_seq_len=256))
    outs: dict[int, list[int]] = {0: [], 1: [], 2: []}
    slot_of = {0: 0, 1: 3, 2: 1}
    start_step = {0: 0, 1: 3, 2: 7}
    evicted_at, resumed_at = 9, 15
    for step in range(60):
        for i, s in start_step.items():
            if step == s:
                prefix = engine.prefill(prompts[i], SlotSampling())
                engine.insert(prefix, slot_of[i])
                outs[i].append(int(prefix.token))
        if step == evicted_at:
            engine.free(slot_of[0])
        if step == resumed_at:  # recompute: prompt + generated, the pending token re-derived by the prefill
            slot_of[0] = 2
            prefix = engine.prefill(prompts[0] + outs[0][:-1], SlotSampling())
            assert int(prefix.token) == outs[0][-1]
            engine.insert(prefix, slot_of[0])
        tokens = np.asarray(engine.generate())
        for i, slot in slot_of.items():
            if engine.host_active[slot] and 0 < len(outs[i]) < n:
                outs[i].append(int(tokens[slot]))
    assert [outs[i] for i in range(3)] == alone


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_engine_resumes_an_evicted_slot_exactly(tiny, mode):
    _, model = tiny
    prompts = _prompts(3, seed=4)
    n = 40
    sampling = SlotSampling(temperature=0.9, top_k=20, seed=11)
    alone = [_run_alone(model, p, n, sampling) for p in prompts]
    engine = Engine(model, EngineConfig(num_slots=3, max_seq_len=256, cache_bucket_step=16))
    outs, slot_of, saved = {}, {}, None
    for i, prompt in enumerate(prompts):
        prefix = engine.prefill(prompt, sampling)
        engine.insert(prefix, i)
        outs[i], slot_of[i] = [int(prefix.token)], i
    for step in range(80):
        if step == 5:  # request 0 leaves its slot after a few tokens
            expected_bytes = engine.swap_out_nbytes(0)
            saved = engine.swap_out(0) if mode == "swap" else engine.free(0)
            assert not engine.host_active[0]
            slot_of.pop(0)
        if step == 30:  # ... and comes back in another slot, once the cache has grown for the others
            assert engine.cache_len > 16
            engine.free(2)  # request 2 is done by now
            slot_of.pop(2)
            if mode == "swap":
                assert int(saved.length) == len(prompts[0]) + len(outs[0]) - 1 and saved.nbytes == expected_bytes > 0
                engine.insert(saved, 2)
            else:
                prefix = engine.prefill(prompts[0] + outs[0][:-1], sampling)
                assert int(prefix.token) == outs[0][-1]
                engine.insert(prefix, 2)
            slot_of[0] = 2
        tokens = np.asarray(engine.generate())
        for i, slot in slot_of.items():
            if len(outs[i]) < n:
                outs[i].append(int(tokens[slot]))
    assert outs[0] == alone[0] and outs[1] == alone[1]
    engine.free(1)
    with pytest.raises(ValueError, match="not an active slot"):
        engine.swap_out(1)


@pytest.mark.parametrize("mode, budget_mb", [("swap", 64.0), ("recompute", 64.0), ("swap", 0.0)])
def test_orchestrator_preemption_keeps_tokens_exact(tiny, mode, budget_mb):
    loaded, model = tiny
    prompts = _prompts(5, seed=1)
    lengths = [30, 25, 6, 5, 4]

    def run(policy, prompt_ids, num_slots, stagger):
        engine = Engine(model, EngineConfig(num_slots=num_slots, max_seq_len=256))
        sched = Scheduler(policy, num_slots)
        orch = Orchestrator(engine, loaded.tokenizer, sched, preempt_mode=mode, swap_budget_mb=budget_mb)
        got: dict[str, list[int]] = {}
        ids = []
        for i in prompt_ids:
            sp = SamplingParams(max_tokens=lengths[i], temperature=0.8, seed=100 + i, ignore_eos=True)
            # oracle-srtf ranks by true remaining length, so short late arrivals preempt long runners
            rid = orch.submit(prompts[i], sp, lambda ev: got.setdefault(ev.request_id, []).extend(ev.token_ids),
                              request_id=f"r{i}", true_output_len=lengths[i])
            ids.append(rid)
            for _ in range(stagger):
                orch._boundary()
        orch.run_until_idle()
        return got, sched.num_preemptions, orch.stats()

    solo = {f"r{i}": run("fcfs", [i], 1, 0)[0][f"r{i}"] for i in range(5)}
    together, preemptions, stats = run("oracle-srtf", range(5), 2, 3)
    assert preemptions > 0
    assert together == solo
    assert all(len(solo[f"r{i}"]) == lengths[i] for i in range(5))
    swapped = mode == "swap" and budget_mb > 0  # a zero budget keeps no K/V: every resume recomputes
    assert stats["swapped_in"] == (preemptions if swapped else 0)
    assert stats["recomputed_resumes"] == (0 if swapped else preemptions)
    assert stats["swapped_bytes"] == 0  # every kept K/V was handed back


def test_sampling_is_seeded_per_request_and_respects_top_k_top_p():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 50)).astype(np.float32) * 3
    greedy = logits.argmax(-1)
    zeros = np.zeros(4, np.int32)
    pos = np.arange(4, dtype=np.int32)
    seeds = np.array([1, 2, 3, 4], np.uint32)

    sample = jax.jit(sample_tokens)

    def draw(temp, top_k, top_p, seeds=seeds, positions=pos):
        return np.asarray(sample(logits, np.full(4, temp, np.float32), np.full(4, top_k, np.int32),
                                        np.full(4, top_p, np.float32), seeds, positions))

    assert (draw(0.0, 0, 1.0) == greedy).all()
    assert (draw(1.0, 1, 1.0) == greedy).all()  # top-k 1 is greedy
    assert (draw(1.0, 0, 1e-6) == greedy).all()  # a tiny nucleus keeps only the top token
    assert (draw(1.0, 0, 1.0) == draw(1.0, 0, 1.0)).all()  # same seeds, same tokens
    many = np.stack([draw(1.0, 5, 1.0, positions=pos + 10 * k) for k in range(60)])
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    assert all(set(many[:, r]) <= set(top5[r]) for r in range(4))
    assert len(set(many[:, 0])) > 1  # it does sample
    # a row's token does not depend on the other rows' seeds (batch composition)
    other = draw(1.0, 0, 1.0, seeds=np.array([1, 9, 9, 9], np.uint32))
    assert other[0] == draw(1.0, 0, 1.0)[0]
    kept = np.isfinite(np.asarray(jax.jit(_filter_top_k_top_p)(logits, zeros + 3, np.full(4, 1.0, np.float32))))
    assert (kept.sum(-1) == 3).all()


def test_engine_rejects_oversize_and_resizes_cache(tiny):
    _, model = tiny
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256, cache_bucket_step=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.prefill(list(range(256)), SlotSampling())
    prefix = engine.prefill(list(range(100)), SlotSampling())
    engine.insert(prefix, 0)
    assert engine.cache_len >= 101
    engine.free(0)
    engine.insert(engine.prefill([1, 2, 3], SlotSampling()), 1)
    engine.generate()
    assert engine.cache_len == engine.config.cache_bucket(5)  # shrank back once the long sequence left


def test_orchestrator_stop_strings_cancel_timeout_and_bad_consumer(tiny):
    loaded, model = tiny
    engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=256))
    orch = Orchestrator(engine, loaded.tokenizer, Scheduler("fcfs", 2))
    events: dict[str, list] = {}

    def collect(ev):
        events.setdefault(ev.request_id, []).append(ev)

    prompt = loaded.tokenizer.encode("abc")
    orch.submit(prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), collect, request_id="full")
    orch.run_until_idle()
    full_text = "".join(e.text for e in events["full"])
    assert events["full"][-1].finish_reason == "length" and len(full_text) > 4
    stop = full_text[3:5]
    orch.submit(prompt, SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=(stop,)), collect,
                request_id="stopped")
    orch.submit(prompt, SamplingParams(max_tokens=200, ignore_eos=True), collect, request_id="cancelled")
    orch.submit(prompt, SamplingParams(max_tokens=200, ignore_eos=True), collect, request_id="slow", timeout_s=1e-3)

    def explode(ev):
        raise RuntimeError("consumer bug")

    orch.submit(prompt, SamplingParams(max_tokens=200, ignore_eos=True), explode, request_id="broken")
    orch._boundary()
    orch.cancel("cancelled")
    orch.run_until_idle()
    stopped = "".join(e.text for e in events["stopped"])
    assert events["stopped"][-1].finish_reason == "stop"
    assert stopped == full_text[: full_text.find(stop)]
    assert events["cancelled"][-1].finish_reason == "cancelled"
    assert events["slow"][-1].finish_reason == "timeout"
    assert orch.stats()["running"] == 0 and orch.stats()["queue_len"] == 0
    with pytest.raises(ValueError, match="prompt has"):
        orch.submit(list(range(5)) * 100, SamplingParams(), collect)
    with pytest.raises(ValueError, match="max_tokens"):
        orch.submit(prompt, SamplingParams(max_tokens=0), collect)


SHARDED_SCRIPT = textwrap.dedent("""
    import json, numpy as np
    from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
    from ltr_jax.engine.sharding import make_mesh
    from ltr_jax.models.llama import Llama
    from ltr_jax.models.tiny import tiny_model
    import jax
    assert len(jax.devices()) == 4, jax.devices()
    loaded = tiny_model(seed=5, n_heads=8, n_kv_heads=4, dim=64, ffn_dim=128)
    model = Llama.from_params(loaded.config, loaded.params)
    def run(mesh):
        e = Engine(model, EngineConfig(num_slots=4, max_seq_len=128), mesh=mesh)
        outs = []
        for slot, prompt in enumerate([[1, 2, 3], [40, 41, 42, 43, 44], [7] * 9]):
            p = e.prefill(prompt, SlotSampling(temperature=0.7, seed=slot))
            e.insert(p, slot)
            outs.append([int(p.token)])
        for _ in range(12):
            t = np.asarray(e.generate())
            for slot in range(3):
                outs[slot].append(int(t[slot]))
        return outs, str(e.decode_state.cache[0][0].sharding)
    single, _ = run(None)
    sharded, spec = run(make_mesh(4))
    # the ranker's kept pass (one device) starts a prefill on the mesh: the same first token as a full prefill
    from ltr_jax.engine.ranking import shares_ranker_pass
    from ltr_jax.models.ranker import RankerHead, RankerScorer, RankerSpec
    spec_r = RankerSpec(model_name="tiny", model_dim=64, n_layers=1, hidden_dims=(8,), max_prompt_len=32)
    scorer = RankerScorer(spec_r, RankerHead.for_spec(spec_r), loaded.config, loaded.params, max_batch=2)
    e = Engine(model, EngineConfig(num_slots=2, max_seq_len=128), mesh=make_mesh(4))
    prompt = [3, 9, 27, 81, 11]
    state = scorer.raw_with_state([prompt])[2][0]
    resumed, full = e.prefill_from_state(state, SlotSampling()), e.prefill(prompt, SlotSampling())
    e.insert(resumed, 0)
    reuse = [shares_ranker_pass(e, scorer), int(resumed.token) == int(full.token), e.stats.resumed_prefills]
    print(json.dumps({"single": single, "sharded": sharded, "spec": spec, "reuse": reuse}))
""")


def test_tensor_parallel_on_four_cpu_devices_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["sharded"] == result["single"]
    assert "tp" in result["spec"]
    assert result["reuse"] == [True, True, 1]


def test_a_steps_tokens_stay_readable_after_the_next_step_is_dispatched(tiny):
    """The orchestrator dispatches step k+1 before it reads step k's tokens: the tokens a step returns must not be
    the decode state's buffer that the next step is donated."""
    _, model = tiny

    def steps(read_each: bool) -> list[list[int]]:
        engine = Engine(model, EngineConfig(num_slots=2, max_seq_len=64))
        engine.insert(engine.prefill([1, 2, 3], SlotSampling()), 0)
        got = [engine.generate() for _ in range(3)] if not read_each else \
            [np.asarray(engine.generate()) for _ in range(3)]
        return [np.asarray(t).tolist() for t in got]

    assert steps(read_each=False) == steps(read_each=True)


@pytest.mark.parametrize("slots", [1, 4])
def test_decode_step_updates_the_donated_cache_in_place(tiny, slots):
    """The compiled decode step writes one row per slot into the cache it was given: the cache buffers are
    aliased input->output and no instruction other than the row scatter (and free reshapes of it) produces a
    cache-sized array (no copy, transpose, pad, concatenate or dynamic-update-slice of the cache per step). One slot
    is its own case: XLA rewrites a one-row scatter and copied the cache for it."""
    import re

    from ltr_jax.engine.engine import _GENERATE

    _, model = tiny
    engine = Engine(model, EngineConfig(num_slots=slots, max_seq_len=256))
    engine.resize_cache(128)
    d = engine.decode_state
    hlo = _GENERATE.lower(engine.graphdef, engine.params, d.cache, d.tokens, d.lengths).compile().as_text()
    c = model.config
    kv, hd = c.n_kv_heads, c.head_dim
    cache_shapes = (f"f32[{slots},{kv},128,{hd}]", f"f32[{slots * kv},128,{hd}]",  # values
                    f"f32[{slots},{kv},{hd},128]", f"f32[{slots * kv},{hd},128]")  # keys
    producers = [line.split("=", 1)[1].strip() for line in hlo.splitlines()
                 if "=" in line and line.split("=", 1)[1].strip().startswith(cache_shapes)]
    kinds = {re.match(r"\S+\s+(\S+?)\(", p).group(1) for p in producers}
    assert kinds <= {"parameter", "scatter", "fusion", "bitcast"}, kinds
    assert all("scatter" in p for p in producers if " fusion(" in p)
    aliases = re.search(r"input_output_alias=\{(.*?)\}, entry", hlo).group(1)
    assert aliases.count("may-alias") >= 2 * c.n_layers  # every K and V buffer is donated and reused


def test_a_burst_is_ranked_over_several_boundaries_while_the_running_request_decodes(tiny):
    loaded, model = tiny
    prompts = _prompts(7, seed=4)
    got: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    calls: list[tuple[int, int]] = []  # (prompts scored in the call, tokens "first" had by then)

    class CountingRanker(NoRanking):
        def rank(self, requests, batch):
            calls.append((len(batch), len(got.get("first", []))))
            for req, p in zip(requests, batch):
                req.score = -len(p)
            self.counters["ranker_requests"] += len(batch)

    def sink(ev):
        got.setdefault(ev.request_id, []).extend(ev.token_ids)
        if ev.finished:
            finish[ev.request_id] = ev.finish_reason

    def run(score_per_boundary):
        got.clear(), finish.clear(), calls.clear()
        engine = Engine(model, EngineConfig(num_slots=1, max_seq_len=256))
        orch = Orchestrator(engine, loaded.tokenizer, Scheduler(make_policy("ltr", max_preemptions=0), 1),
                            ranking=CountingRanker(), score_per_boundary=score_per_boundary)
        orch.submit(prompts[0], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), sink,
                    request_id="first")
        orch._boundary()  # "first" is scored and starts decoding
        for i in range(1, 7):  # then a burst of six arrives; the last is cancelled before it is ever scored
            orch.submit(prompts[i], SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True), sink,
                        request_id=f"b{i}")
        orch.cancel("b6")
        orch.run_until_idle()
        return orch.stats()

    stats = run(score_per_boundary=2)
    assert [n for n, _ in calls] == [1, 2, 2, 1]  # the burst took three boundaries, two prompts at most in each
    first_tokens = [t for _, t in calls[1:]]
    assert first_tokens == sorted(set(first_tokens))  # "first" kept producing tokens between the ranker's calls
    assert stats["ranker_requests"] == 6 and finish["b6"] == "cancelled" and got.get("b6", []) == []
    assert len(got["first"]) == 20 and all(len(got[f"b{i}"]) == 3 for i in range(1, 6))
    bounded = {k: list(v) for k, v in got.items()}

    run(score_per_boundary=None)  # every arrival at once: one ranker call for the whole burst, the same tokens
    assert [n for n, _ in calls] == [1, 5] and got == bounded
    with pytest.raises(ValueError, match="score_per_boundary"):
        Orchestrator(Engine(model, EngineConfig(num_slots=1, max_seq_len=256)), loaded.tokenizer, Scheduler("ltr", 1),
                     score_per_boundary=0)


def test_busy_time_includes_the_arrivals_ranker_passes(tiny):
    """The loop's busy time is its whole working time: a slow ranker's passes are in it, not beside it."""
    loaded, model = tiny
    prompts = _prompts(3, seed=6)

    class SlowRanker(NoRanking):
        def rank(self, requests, batch):
            time.sleep(0.5)
            self.counters["ranker_calls"] += 1

    engine = Engine(model, EngineConfig(num_slots=4, max_seq_len=256))

    def serve(ranker):
        orch = Orchestrator(engine, loaded.tokenizer, Scheduler(make_policy("ltr"), 4), ranking=ranker)
        for i, p in enumerate(prompts):
            orch.submit(p, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), lambda ev: None)
        orch.run_until_idle()
        return orch.stats()

    serve(None)  # compiles the shapes, so the second run's engine work is only the work itself (milliseconds)
    ranked = serve(SlowRanker())
    assert ranked["ranker_seconds"] >= 0.5 and ranked["ranker_calls"] == 1
    assert ranked["busy_seconds"] > ranked["ranker_seconds"]  # without the pass it would be those milliseconds


def test_idle_tasks_run_on_the_loop_only_while_no_request_is_in(tiny):
    """`run_when_idle`: tasks run one by one on the loop thread; a request arriving during one gets the loop
    before the next task runs."""
    import threading

    loaded, model = tiny
    orch = Orchestrator(Engine(model, EngineConfig(num_slots=2, max_seq_len=256)), loaded.tokenizer,
                        Scheduler("fcfs", 2))
    log: list[str] = []
    first_running, release = threading.Event(), threading.Event()
    finished = threading.Event()

    def first():
        log.append(f"task 1 on {threading.current_thread().name}")
        first_running.set()
        assert release.wait(60)

    def second():
        log.append(f"task 2 (request finished before: {finished.is_set()}, running: {orch.stats()['running']})")

    def on_event(ev):
        if ev.finished:
            log.append("request finished")
            finished.set()

    orch.run_when_idle([first, second])
    orch.start()
    try:
        assert first_running.wait(60)
        orch.submit(loaded.tokenizer.encode("abc"), SamplingParams(max_tokens=8, ignore_eos=True), on_event)
        release.set()
        assert finished.wait(60)
        assert wait_for(lambda: len(log) == 3, timeout=60)
    finally:
        orch.stop(drain=False, timeout_s=30)
    assert log == ["task 1 on ltr-jax-orchestrator", "request finished",
                   "task 2 (request finished before: True, running: 0)"]


def test_loading_a_model_and_building_an_engine_compile_nothing():
    """Converting host weights to the weights' dtype and making the empty decode state happen on the host: an
    eager jnp op there would compile an executable per shape, and on a CPU each compiled executable stays resident
    (a few MB) for the life of the process. Shapes of its own, so no earlier test has compiled them already."""
    loaded = tiny_model(seed=3, dim=40, n_heads=5, n_kv_heads=1, ffn_dim=72, vocab_size=97)
    with lowerings() as compiled:
        for weight_dtype in ("", "bfloat16"):
            model = Llama.from_params(loaded.config.replace(weight_dtype=weight_dtype), loaded.params)
            Engine(model, EngineConfig(num_slots=3, max_seq_len=128))
    assert compiled == []
