"""The simulator replays the real engine: same policy objects, same loop, same completion order.

On a tiny model, the real orchestrator + engine run under a virtual clock that advances by a fixed step-time
model (prefill 0.25, decode step 1.0 time units); the simulator with that same model must reproduce every request's
completion order AND completion time exactly (tolerance: float equality to 1e-9). Nothing here depends on how fast
the machine is; how well the simulator predicts real wall-clock runs is what `bench resimulate` measures.
"""

from __future__ import annotations

import numpy as np
import pytest

from ltr_jax.engine.engine import Engine, EngineConfig
from ltr_jax.engine.orchestrator import Orchestrator, SamplingParams
from ltr_jax.engine.ranking import make_ranking_stage
from ltr_jax.models.llama import Llama
from ltr_jax.models.ranker import RankerHead, RankerScorer, RankerSpec
from ltr_jax.models.tiny import tiny_model
from ltr_jax.scheduler.scheduler import Scheduler
from ltr_jax.sim.simulator import simulate
from ltr_jax.sim.trace import TraceEntry

PREFILL, DECODE = 0.25, 1.0


def simulated_engine(**shape) -> EngineConfig:
    """The engine loop the simulator models: one prompt per prefill call, and each decode step read before the
    next is dispatched (the virtual clock here advances when a step is dispatched, so a pipelined loop, which reads
    step k after dispatching k+1, would stream every token one step later in this clock, not in real time)."""
    return EngineConfig(prefill_batch=1, decode_pipeline=False, **shape)


class FixedSteps:
    def prefill_time(self, n_tokens: int) -> float:
        return PREFILL

    def decode_time(self, batch: int, tokens_in_cache: int) -> float:
        return DECODE


@pytest.fixture(scope="module")
def tiny():
    loaded = tiny_model(seed=7)
    return loaded, Llama.from_params(loaded.config, loaded.params)


def _trace(n: int, seed: int, spread: float) -> list[TraceEntry]:
    rng = np.random.default_rng(seed)
    arrivals = np.sort(rng.uniform(0, spread, n))
    arrivals[:3] = 0.0  # a small burst at the start
    return [TraceEntry(float(a), int(rng.integers(3, 20)), int(rng.integers(1, 30))) for a in arrivals]


def _sim_finish_times(trace, policy: str, slots: int, model, preempt_mode: str = "swap") -> dict[int, float]:
    result = simulate(trace, Scheduler(policy, slots), model, preempt_mode=preempt_mode)
    return {int(r.request_id.split("-")[1]): r.finish_time for r in result.records}


@pytest.mark.parametrize("policy, preempt_mode", [("fcfs", "swap"), ("oracle-sjf", "swap"),
                                                  ("oracle-srtf", "swap"), ("oracle-srtf", "recompute")])
def test_simulator_reproduces_engine_exactly_in_virtual_time(tiny, policy, preempt_mode):
    loaded, model = tiny
    trace = _trace(14, seed=1, spread=40.0)
    slots = 3
    clock = [0.0]
    engine = Engine(model, simulated_engine(num_slots=slots, max_seq_len=128))
    real_prefill, real_generate = engine.prefill, engine.generate

    def prefill(*a, **k):
        clock[0] += PREFILL
        return real_prefill(*a, **k)

    def generate(*a, **k):
        clock[0] += DECODE
        return real_generate(*a, **k)

    engine.prefill, engine.generate = prefill, generate
    sched = Scheduler(policy, slots)
    orch = Orchestrator(engine, loaded.tokenizer, sched, clock=lambda: clock[0], preempt_mode=preempt_mode)
    finished: dict[int, float] = {}
    rng = np.random.default_rng(0)
    pending = list(enumerate(trace))
    while pending or orch.stats()["running"] or orch.stats()["queue_len"]:
        while pending and pending[0][1].arrival_time <= clock[0]:
            i, e = pending.pop(0)
            orch.submit(rng.integers(0, 256, e.prompt_len).tolist(),
                        SamplingParams(max_tokens=e.output_len, temperature=0.0, ignore_eos=True),
                        lambda ev, i=i: finished.__setitem__(i, clock[0]) if ev.finished else None,
                        request_id=f"req-{i}", true_output_len=e.output_len)
        if not orch._boundary() and pending:
            clock[0] = pending[0][1].arrival_time  # idle: jump to the next arrival, as the simulator does
    simulated = _sim_finish_times(trace, policy, slots, FixedSteps(), preempt_mode)
    if policy == "oracle-srtf":  # the case where the two resume modes differ
        assert sched.num_preemptions > 0
    assert sorted(finished, key=lambda i: (finished[i], i)) == sorted(simulated, key=lambda i: (simulated[i], i))
    for i, when in finished.items():
        assert when == pytest.approx(simulated[i], abs=1e-9)


RANKER = 0.1  # virtual seconds of the ranker's pass per prompt; with reuse a prefill then costs PREFILL - RANKER


@pytest.mark.parametrize("reuse", [True, False])
def test_simulator_reproduces_ranked_engine_exactly_in_virtual_time(tiny, reuse):
    """ltr with a real (tiny) ranker: the sim charges each arrival's ranker pass where the orchestrator runs it."""
    loaded, model = tiny
    spec = RankerSpec(model_name=loaded.config.name, model_dim=loaded.config.dim, n_layers=2, pooling="mean",
                      hidden_dims=(8,), max_prompt_len=64)
    ranker = RankerScorer(spec, RankerHead.for_spec(spec, seed=3), loaded.config, loaded.params)
    rng = np.random.default_rng(5)
    base = _trace(14, seed=4, spread=40.0)
    prompts = [rng.integers(0, 256, e.prompt_len).tolist() for e in base]
    scores = ranker.score(prompts)
    trace = [TraceEntry(e.arrival_time, e.prompt_len, e.output_len, float(sc)) for e, sc in zip(base, scores)]
    slots, clock = 2, [0.0]
    engine = Engine(model, simulated_engine(num_slots=slots, max_seq_len=128))
    real_prefill, real_from_state, real_generate = engine.prefill, engine.prefill_from_state, engine.generate
    real_raw = ranker.raw_with_features  # the one entry the ranking stage scores arrivals through

    def advancing(fn, seconds):
        def wrapped(*a, **k):
            clock[0] += seconds(*a) if callable(seconds) else seconds
            return fn(*a, **k)
        return wrapped

    engine.prefill = advancing(real_prefill, PREFILL)
    engine.prefill_from_state = advancing(real_from_state, PREFILL - RANKER)
    engine.generate = advancing(real_generate, DECODE)
    ranker.raw_with_features = advancing(real_raw, lambda batch: RANKER * len(batch))
    orch = Orchestrator(engine, loaded.tokenizer, Scheduler("ltr", slots), clock=lambda: clock[0],
                        ranking=make_ranking_stage(engine, ranker, reuse_pass=reuse))
    finished: dict[int, float] = {}
    pending = list(enumerate(trace))
    while pending or orch.stats()["running"] or orch.stats()["queue_len"]:
        while pending and pending[0][1].arrival_time <= clock[0]:
            i, e = pending.pop(0)
            orch.submit(prompts[i], SamplingParams(max_tokens=e.output_len, temperature=0.0, ignore_eos=True),
                        lambda ev, i=i: finished.__setitem__(i, clock[0]) if ev.finished else None,
                        request_id=f"req-{i}")
        if not orch._boundary() and pending:
            clock[0] = pending[0][1].arrival_time
    assert orch.stats()["reused_ranker_passes"] == (len(trace) if reuse else 0)
    result = simulate(trace, Scheduler("ltr", slots), FixedSteps(), ranker_time=lambda n: RANKER, ranker_reuse=reuse)
    simulated = {int(r.request_id.split("-")[1]): r.finish_time for r in result.records}
    assert result.extra["ranker_s"] == pytest.approx(RANKER * len(trace))
    assert sorted(finished, key=lambda i: (finished[i], i)) == sorted(simulated, key=lambda i: (simulated[i], i))
    for i, when in finished.items():
        assert when == pytest.approx(simulated[i], abs=1e-9)
