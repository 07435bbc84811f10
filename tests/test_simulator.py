"""Simulator, step-time models, traces, metrics and the CLI; property tests of the scheduler run through the
simulator (which models time exactly, so timing guarantees can be checked)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ltr_jax.scheduler import POLICY_NAMES, RequestState, Scheduler, StarvationConfig, make_policy
from ltr_jax.scheduler.metrics import summarize
from ltr_jax.sim.simulator import simulate
from ltr_jax.sim.step_time import AnalyticStepTime, MeasuredStepTime
from ltr_jax.sim.trace import (
    TraceEntry,
    kendall_tau_vs_length,
    load_lengths,
    make_arrivals,
    make_trace,
    score_buckets,
    synthesize_scores,
)


class LinearStepTime:
    """prefill = a + b * tokens; decode = c + d * batch + e * tokens_in_cache (and records every call)."""

    def __init__(self, a=0.002, b=0.0001, c=0.01, d=0.001, e=0.0):
        self.a, self.b, self.c, self.d, self.e = a, b, c, d, e
        self.prefills: list[int] = []

    def prefill_time(self, n_tokens):
        self.prefills.append(n_tokens)
        return self.a + self.b * n_tokens

    def decode_time(self, batch, tokens_in_cache):
        return self.c + self.d * batch + self.e * tokens_in_cache


def checked_simulate(trace, scheduler, model):
    """simulate() plus invariants at every boundary: slots never exceeded, decisions consistent."""
    seen_admit: list = []

    def on_boundary(sched, now):
        running = sched.running
        assert len(running) <= sched.num_slots
        assert len(set(map(id, running))) == len(running)
        assert all(r.state is RequestState.RUNNING for r in running)
        assert all(r.state is RequestState.WAITING for r in sched.waiting)
        assert not set(map(id, running)) & set(map(id, sched.waiting))
        seen_admit.append(len(running))

    result = simulate(trace, scheduler, model, on_boundary=on_boundary)
    return result


# ---------------------------------------------------------------------- strategies
@st.composite
def traces(draw, max_n=30, max_output=25):
    n = draw(st.integers(1, max_n))
    pattern = draw(st.sampled_from(["burst", "spread", "clustered"]))
    arrivals = []
    for _ in range(n):
        if pattern == "burst":
            arrivals.append(0.0)
        elif pattern == "spread":
            arrivals.append(draw(st.floats(0, 3, allow_nan=False)))
        else:
            arrivals.append(float(draw(st.sampled_from([0.0, 0.05, 1.0, 2.5]))))
    return [
        TraceEntry(
            arrival_time=t,
            prompt_len=draw(st.integers(1, 60)),
            output_len=draw(st.integers(1, max_output)),
            score=draw(st.floats(-3, 3, allow_nan=False)),
            bucket=draw(st.integers(0, 3)),
        )
        for t in arrivals
    ]


policy_configs = st.tuples(
    st.sampled_from(POLICY_NAMES),
    st.sampled_from([None, 0, 1, 3]),
    st.sampled_from([0.0, 0.5]),
)


def build_policy(name, max_preemptions, margin):
    params = {"max_preemptions": max_preemptions, "margin": margin}
    if name == "ltr-rescore":
        params.update(min_samples=3, refresh_every=4)
    return make_policy(name, **params)


# ---------------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    trace=traces(),
    config=policy_configs,
    slots=st.integers(1, 5),
    budget=st.sampled_from([None, 1, 40, 200]),
    starvation=st.sampled_from([
        None, {"rule": "threshold", "threshold_s": 0.05, "quantum_s": 0.02},
        {"rule": "threshold", "threshold_s": 0.3, "quantum_s": 0.1},
        {"rule": "threshold", "threshold_s": 1.0, "quantum_s": 1.0},
        {"rule": "fcfs-slack", "slack_s": 0.05}, {"rule": "fcfs-slack", "slack_s": 0.3, "max_promoted_share": 1.0},
        {"rule": "fcfs-slack", "slack_s": 1.0, "max_promoted_share": 0.2}]),
)
def test_every_request_finishes_exactly_once_with_its_length(trace, config, slots, budget, starvation):
    policy = build_policy(*config)
    starv = StarvationConfig(**starvation) if starvation else None
    sched = Scheduler(policy, slots, starvation=starv, max_prefill_tokens=budget)
    result = checked_simulate(trace, sched, LinearStepTime())
    assert len(result.records) == len(trace)
    assert sorted(r.true_output_len for r in result.records) == sorted(e.output_len for e in trace)
    for r in result.records:
        assert r.state is RequestState.FINISHED
        assert r.generated == r.true_output_len == len(r.token_times)
        assert all(a < b for a, b in itertools.pairwise(r.token_times))
        assert r.arrival_time <= r.first_token_time <= r.finish_time == r.token_times[-1]
        if policy.max_preemptions is not None:  # past the cap only for or after a promotion
            assert r.preemptions - r.preemptions_past_cap <= policy.max_preemptions
        if starv is None:
            assert r.preemptions_past_cap == 0
    assert sched.num_running == 0 and sched.num_waiting == 0 and len(sched) == 0
    assert sched.num_preemptions == sum(r.preemptions for r in result.records)
    assert sched.num_promotions == sum(r.promotions for r in result.records)
    if starv is None:
        assert sched.num_promotions == 0


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    name=st.sampled_from(POLICY_NAMES),
    slots=st.integers(1, 4),
    threshold=st.sampled_from([0.02, 0.1, 0.3]),
    quantum=st.sampled_from([0.02, 0.1, 0.4]),
    requeue=st.booleans(),
)
def test_starvation_bound_on_max_waiting_time(data, name, slots, threshold, quantum, requeue):
    """Guarantee (stated conditions: at most 2 x num_slots requests in the trace, no prefill budget, no
    preemption cap): max_waiting_time <= threshold + quantum + one iteration (boundary detection delay) + the
    prefill phase of the boundary that admits the request."""
    trace = data.draw(traces(max_n=2 * slots, max_output=150))
    sched = Scheduler(
        build_policy(name, None, 0.0), slots,
        starvation=StarvationConfig(rule="threshold", threshold_s=threshold, quantum_s=quantum,
                                    requeue_after_quantum=requeue),
    )
    result = checked_simulate(trace, sched, LinearStepTime())
    bound = threshold + quantum + result.max_iteration_s + result.max_prefill_phase_s + 1e-9
    worst = max(r.max_waiting_time for r in result.records)
    assert worst <= bound, (worst, bound)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=25),
    prompts=st.data(),
    slots=st.integers(1, 6),
)
def test_oracle_sjf_burst_completes_in_length_order(lengths, prompts, slots):
    """All requests at t=0, any number of slots: a request admitted later with a longer output finishes later,
    so completion times are strictly increasing in output length (equal lengths may finish together)."""
    trace = [TraceEntry(0.0, prompts.draw(st.integers(1, 50)), n, 0.0, 0) for n in lengths]
    result = checked_simulate(trace, Scheduler(make_policy("oracle-sjf"), slots), LinearStepTime())
    by_length = sorted(result.records, key=lambda r: r.true_output_len)
    for a, b in itertools.pairwise(by_length):
        if a.true_output_len < b.true_output_len:
            assert a.finish_time < b.finish_time
    assert result.num_preemptions == 0


@settings(max_examples=60, deadline=None)
@given(trace=traces(), slots=st.integers(1, 4), max_preemptions=st.sampled_from([None, 0, 2]))
def test_ltr_with_perfect_scores_behaves_like_oracle_sjf(trace, slots, max_preemptions):
    perfect = [e._replace(score=-float(e.output_len)) for e in trace]
    ltr = simulate(perfect, Scheduler(make_policy("ltr", max_preemptions=max_preemptions), slots),
                   LinearStepTime())
    sjf = simulate(perfect, Scheduler(make_policy("oracle-sjf", max_preemptions=max_preemptions), slots),
                   LinearStepTime())
    assert [r.token_times for r in ltr.records] == [r.token_times for r in sjf.records]
    assert ltr.num_preemptions == sjf.num_preemptions


# ---------------------------------------------------------------------- exact timing
def _one_preemption(preempt_mode):
    model = LinearStepTime(a=0.0, b=0.001, c=0.01, d=0.0)
    trace = [
        TraceEntry(0.0, prompt_len=10, output_len=3, score=0.0),
        TraceEntry(0.015, prompt_len=20, output_len=1, score=5.0),
    ]
    result = simulate(trace, Scheduler(make_policy("ltr"), 1), model, preempt_mode=preempt_mode)
    return model, result, *result.records


def test_simulator_models_time_and_reprefill_exactly():
    model, result, long_job, short = _one_preemption("recompute")
    # t=0: prefill 10 tokens (0.010) -> token 1; decode (0.010) -> token 2 at 0.020
    # t=0.020: short arrived at 0.015, displaces long_job; prefill 20 (0.020) -> its only token at 0.040
    # t=0.040: long_job resumes, re-prefills 10 + 2 = 12 tokens -> token 3 at 0.052
    assert long_job.token_times == pytest.approx([0.010, 0.020, 0.052])
    assert short.token_times == pytest.approx([0.040])
    assert model.prefills == [10, 20, 12]
    assert long_job.preemptions == 1 and long_job.max_waiting_time == pytest.approx(0.032)
    assert short.ttft == pytest.approx(0.025)
    assert result.sim_time_s == pytest.approx(0.052)


def test_simulator_resumes_a_swapped_request_without_a_prefill():
    model, result, long_job, short = _one_preemption("swap")
    # as above until t=0.040; then long_job's kept K/V goes back into the slot at no cost and the decode step
    # (0.010) yields token 3 at 0.050
    assert long_job.token_times == pytest.approx([0.010, 0.020, 0.050])
    assert short.token_times == pytest.approx([0.040])
    assert model.prefills == [10, 20]
    assert long_job.preemptions == 1 and long_job.max_waiting_time == pytest.approx(0.030)
    assert result.sim_time_s == pytest.approx(0.050)
    with pytest.raises(ValueError, match="preempt_mode"):
        _one_preemption("drop")


def _ranked_pair(policy, ranker_time=None, ranker_reuse=False):
    model = LinearStepTime(a=0.0, b=0.001, c=0.01, d=0.0)
    trace = [TraceEntry(0.0, prompt_len=10, output_len=3, score=5.0),
             TraceEntry(0.015, prompt_len=20, output_len=1, score=0.0)]
    result = simulate(trace, Scheduler(make_policy(policy, max_preemptions=0), 1), model,
                      ranker_time=ranker_time, ranker_reuse=ranker_reuse)
    return result, *result.records


def test_simulator_charges_the_ranker_pass_at_arrival():
    half = lambda n: 0.0005 * n  # the ranker pass = half of the prompt's prefill
    # free ranking: prefill 10 (0.010) -> token 1; decode -> 0.020; the second arrives at 0.015, waits for the slot;
    # decode -> 0.030 (first done); prefill 20 (0.020) -> 0.050
    _, first, second = _ranked_pair("ltr")
    assert first.token_times == pytest.approx([0.010, 0.020, 0.030])
    assert second.token_times == pytest.approx([0.050])
    # a separate ranker (no reuse): 0.005 before the first prefill; the second's pass (0.010) runs at the boundary
    # of 0.025 where it is added, before the decode step, and delays the running request
    result, first, second = _ranked_pair("ltr", ranker_time=half)
    assert first.token_times == pytest.approx([0.015, 0.025, 0.045])
    assert second.token_times == pytest.approx([0.065])
    assert result.extra["ranker_s"] == pytest.approx(0.015)
    # reused: the pass is the first half of the prefill, so each prefill costs the other half
    result, first, second = _ranked_pair("ltr", ranker_time=half, ranker_reuse=True)
    assert first.token_times == pytest.approx([0.010, 0.020, 0.040])
    assert second.token_times == pytest.approx([0.050])
    assert result.extra["busy_s"] == pytest.approx(0.050)  # the same work, the second pass done earlier
    # policies that do not rank pay nothing
    for policy in ("fcfs", "oracle-sjf"):
        result, first, second = _ranked_pair(policy, ranker_time=half)
        assert first.token_times == pytest.approx([0.010, 0.020, 0.030])
        assert "ranker_s" not in result.extra


def test_simulator_jumps_over_idle_time():
    trace = [TraceEntry(0.0, 5, 1), TraceEntry(100.0, 5, 2)]
    result = simulate(trace, Scheduler("fcfs", 2), LinearStepTime(a=0.0, b=0.001, c=0.01, d=0.0))
    assert result.records[1].token_times == pytest.approx([100.005, 100.015])
    assert result.iterations == 2


def test_simulation_is_deterministic():
    pairs = [(20, 5), (50, 80), (10, 300), (30, 12)]
    trace, _ = make_trace(pairs, 300, rate=40.0, seed=3)
    model = AnalyticStepTime.for_llama3_8b_h100()
    a = summarize(simulate(trace, Scheduler("ltr", 8), model).records)
    b = summarize(simulate(trace, Scheduler("ltr", 8), model).records)
    assert a == b


# ---------------------------------------------------------------------- step-time models
def test_analytic_llama3_8b_h100_roofline():
    m = AnalyticStepTime.for_llama3_8b_h100()
    weights = 8.03e9 * 2
    bw = 3.35e12 * 0.85
    assert m.decode_time(1, 0) == pytest.approx(weights / bw)  # ~5.6 ms, memory bound
    kv = 32 * 1024 * 128 * 1024
    assert m.decode_time(32, 32 * 1024) == pytest.approx((weights + kv) / bw)
    flops = 2 * 8.03e9 * 4096 + 4 * 32 * 4096 * 4096 * 4097 / 2
    assert m.prefill_time(4096) == pytest.approx(flops / (989e12 * 0.6))  # compute bound
    assert m.prefill_time(1) == pytest.approx((weights + 128 * 1024) / bw)
    with pytest.raises(ValueError, match="compute_efficiency"):
        AnalyticStepTime.for_llama3_8b_h100(compute_efficiency=1.5)


def test_measured_step_time_fits_linear_models(tmp_path):
    decode = [{"batch": b, "tokens_in_cache": t, "seconds": 0.004 + 0.0002 * b + 1e-7 * t}
              for b in (1, 4, 16, 64) for t in (100, 5000, 40000)]
    prefill = [{"tokens": n, "seconds": 0.003 + 2e-5 * n + 1e-9 * n * n} for n in (16, 64, 256, 1024, 2048)]
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"decode": decode, "prefill": prefill}))
    m = MeasuredStepTime.from_json(path)
    assert m.decode_time(8, 2000) == pytest.approx(0.004 + 0.0016 + 2e-4)
    assert m.prefill_time(512) == pytest.approx(0.003 + 2e-5 * 512 + 1e-9 * 512**2)
    with pytest.raises(ValueError, match="tokens_in_cache"):
        MeasuredStepTime.from_json({"decode": [{"batch": 1, "seconds": 0.1}] * 3, "prefill": prefill})
    with pytest.raises(ValueError, match="prefill"):
        MeasuredStepTime.from_json({"decode": decode})
    with pytest.raises(FileNotFoundError):
        MeasuredStepTime.from_json(tmp_path / "missing.json")


# ---------------------------------------------------------------------- traces
def test_arrival_processes():
    poisson = make_arrivals("poisson", 20000, rate=50.0, seed=1)
    assert np.all(np.diff(poisson) >= 0)
    assert 20000 / poisson[-1] == pytest.approx(50.0, rel=0.03)
    gaps = np.diff(make_arrivals("gamma", 20000, rate=50.0, cv=3.0, seed=1))
    assert gaps.std() / gaps.mean() == pytest.approx(3.0, rel=0.1)
    assert not make_arrivals("burst", 10).any()
    with pytest.raises(ValueError, match="valid: poisson, gamma, burst"):
        make_arrivals("uniform", 3, 1.0)
    with pytest.raises(ValueError, match="rate"):
        make_arrivals("poisson", 3)


def test_synthetic_scores_hit_the_target_kendall_tau():
    lengths = np.random.default_rng(0).lognormal(4.5, 1.0, 5000).astype(int) + 1
    scores, tau = synthesize_scores(lengths, 0.55, seed=1)
    assert tau == pytest.approx(0.55, abs=0.02)
    assert kendall_tau_vs_length(scores, lengths) == pytest.approx(tau)
    buckets = score_buckets(scores, 4)
    assert set(buckets) == {0, 1, 2, 3}
    assert np.mean(lengths[buckets == 0]) < np.mean(lengths[buckets == 3])  # bucket 0 = expected shortest


def test_load_lengths_from_label_file(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"id": "a", "prompt": "one two three four five six seven eight nine ten", "reference": "x"})
        + "\n"
    )
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        json.dumps({"id": "a", "output_tokens": 42}) + "\n" + json.dumps({"id": "b", "output_len": 7,
                                                                          "prompt_tokens": 3}) + "\n"
    )
    pairs, source = load_lengths(labels, prompts)
    assert pairs == [(13, 42), (3, 7)]
    assert "label file" in source
    pairs, source = load_lengths(None, prompts)
    assert pairs == [(13, 1)] and "whitespace words x 1.3" in source
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "tokens": 3}) + "\n")
    with pytest.raises(ValueError, match="output_tokens or output_len"):
        load_lengths(bad, prompts)
    with pytest.raises(FileNotFoundError, match="label file"):
        load_lengths(tmp_path / "nope.jsonl", prompts)


# ---------------------------------------------------------------------- metrics and CLI
def test_summarize_hand_example():
    trace = [TraceEntry(0.0, 10, 2), TraceEntry(0.0, 10, 1)]
    result = simulate(trace, Scheduler(make_policy("oracle-sjf"), 1), LinearStepTime(a=0.0, b=0.001, c=0.01, d=0))
    # short (1 token): prefill 0.010 -> done at 0.010; long: prefill at 0.010 -> 0.020, decode -> 0.030
    s = summarize(result.records)
    assert s["num_finished"] == 2 and s["output_tokens"] == 3
    assert s["latency_s"]["mean"] == pytest.approx(0.02)
    assert s["normalized_latency_s_per_token"]["mean"] == pytest.approx((0.010 + 0.015) / 2)
    assert s["ttft_s"]["max"] == pytest.approx(0.02)
    assert s["tpot_s"]["mean"] == pytest.approx(0.010)
    assert s["throughput_req_s"] == pytest.approx(2 / 0.03)
