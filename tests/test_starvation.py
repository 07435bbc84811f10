"""The fcfs-slack starvation rule: its FCFS delay estimate against a real FCFS run, no thrashing where fixed
thresholds thrash, and the slot rules of promoted requests."""

from dataclasses import replace

import numpy as np
import pytest
from sortedcontainers import SortedList

from ltr_jax.scheduler.policies import make_policy
from ltr_jax.scheduler.request import Request
from ltr_jax.scheduler.scheduler import Scheduler
from ltr_jax.scheduler.starvation import StarvationConfig, WorkModel
from ltr_jax.sim.simulator import simulate
from ltr_jax.sim.step_time import AnalyticStepTime
from ltr_jax.sim.trace import TraceEntry, make_trace


def lognormal_pairs(seed=0, n=500):
    rng = np.random.default_rng(seed)
    prompts = rng.integers(20, 400, n)
    outputs = np.clip(rng.lognormal(5.0, 1.0, n), 2, 2000)
    return [(int(p), int(o)) for p, o in zip(prompts, outputs)]


def estimates_at_arrivals(trace, policy):
    """Run ``policy`` with fcfs-slack's accounting on (promotions off: a huge slack) and return the FCFS delay
    the scheduler estimated at the first boundary after each arrival, in arrival order."""
    seen = []
    sched = Scheduler(make_policy(policy), 64, starvation=StarvationConfig(slack_s=1e9))
    simulate(trace, sched, AnalyticStepTime.for_llama3_8b_h100(),
             on_boundary=lambda s, now: seen.append((now, s.fcfs_delay_s())))
    seen = np.array(seen)
    arrivals = np.sort([e.arrival_time for e in trace])
    return seen[np.clip(np.searchsorted(seen[:, 0], arrivals), 0, len(seen) - 1), 1]


@pytest.mark.parametrize("rate", [45.0, 60.0])
def test_fcfs_delay_estimate_matches_an_actual_fcfs_run(rate):
    """Stated error (3,000 requests, 64 slots, Llama-3-8B step model, near and past capacity; measured: fcfs mean
    TTFT 12.7 / 20.7 s). Estimated while fcfs runs, the mean absolute error is under 5% of FCFS's mean TTFT
    (measured 0.35 / 0.54 s) and 95% of requests are within 5% of FCFS's worst. Estimated while ltr runs with no
    promotions (tau 0.55; the long requests it defers never finish, so their classes' costs are known only as
    lower bounds), the estimate errs low, never ahead of FCFS by more than 2% of its worst (measured: mean error
    -2.3 / -6.1 s, never above), and its mean absolute error is under 40% of FCFS's mean TTFT."""
    trace, _ = make_trace(lognormal_pairs(), 3000, rate, "poisson", 1.0, 0.55, 8, 0)
    fcfs = simulate(trace, Scheduler("fcfs", 64), AnalyticStepTime.for_llama3_8b_h100())
    ttft = np.array([r.ttft for r in sorted(fcfs.records, key=lambda r: r.arrival_time)])
    assert ttft.mean() > 5.0  # a queue builds: there is something to estimate
    err = estimates_at_arrivals(trace, "fcfs") - ttft
    assert np.abs(err).mean() < 0.05 * ttft.mean()
    assert np.percentile(np.abs(err), 95) < 0.05 * ttft.max()
    err_ltr = estimates_at_arrivals(trace, "ltr") - ttft
    assert err_ltr.max() < 0.02 * ttft.max()  # late promotions would break the promise; early ones cost gain
    assert np.abs(err_ltr).mean() < 0.4 * ttft.mean()


def overload_trace(n=3000):
    """Two slots, arrivals 1.7x faster than they can be served for 150 s: short requests the ranker puts first keep
    coming, and the long ones it puts last wait, in the order of their scores (not of their arrival)."""
    rng = np.random.default_rng(3)
    trace = []
    for i in range(n):
        long = i % 5 == 0
        trace.append(TraceEntry(arrival_time=0.05 * i, prompt_len=16, output_len=60 if long else 6,
                                score=-1.0 - rng.random() if long else 1.0 + rng.random(), bucket=0))
    return trace


class ConstantStep:
    def prefill_time(self, n_tokens):
        return 0.001

    def decode_time(self, batch, tokens_in_cache):
        return 0.01


def mean_latency(result):
    return sum(r.latency for r in result.records) / len(result.records)


def worst_wait(result):
    return max(r.max_waiting_time for r in result.records)


def test_fixed_thresholds_thrash_where_fcfs_slack_does_not():
    trace = overload_trace()
    fcfs = simulate(trace, Scheduler("fcfs", 2), ConstantStep())
    ltr = simulate(trace, Scheduler(make_policy("ltr"), 2), ConstantStep())
    fixed = simulate(trace, Scheduler(make_policy("ltr"), 2, starvation=StarvationConfig(
        rule="threshold", threshold_s=5.0, quantum_s=1.0)), ConstantStep())
    assert fixed.num_promotions > 2 * len(trace)  # everyone crosses 5 s: the same requests again and again
    assert max(r.promotions for r in fixed.records) > 10
    assert worst_wait(ltr) > worst_wait(fcfs) + 60  # the ranking alone breaks the promise
    config = StarvationConfig()  # the default rule and slack
    guarded = simulate(trace, Scheduler(make_policy("ltr"), 2, starvation=config), ConstantStep())
    assert 0 < guarded.num_promotions < 0.1 * len(trace)
    assert max(r.promotions for r in guarded.records) <= config.run_to_end_after
    # within the slack, give or take the wait for the one promoted slot (a long request holds it for 0.6 s)
    assert worst_wait(guarded) <= worst_wait(fcfs) + config.slack_for(worst_wait(fcfs)) + 0.6
    gain_kept = (mean_latency(fcfs) - mean_latency(guarded)) / (mean_latency(fcfs) - mean_latency(ltr))
    assert gain_kept > 0.9


def starve(sched, runners, t, until):
    """Let ``runners`` decode (0.1 s per step) until ``until`` while everyone else waits."""
    while t < until:
        t = round(t + 0.1, 6)
        for r in runners:
            if r in sched.running:
                sched.on_token(r, t)
        sched.schedule(t)
    return t


def busy_and_starved(config: StarvationConfig, slots: int, n_busy: int, n_starved: int):
    """A scheduler of ``slots`` slots at t = 0 with ``n_busy`` well-ranked requests (they take the slots) and
    ``n_starved`` badly-ranked ones, all 500 tokens long; returns (scheduler, busy, starved)."""
    sched = Scheduler(make_policy("ltr", max_preemptions=0), slots, starvation=config)
    busy = [Request(f"b{i}", 0.0, 4, 500, score=5.0) for i in range(n_busy)]
    starved = [Request(f"s{i}", 0.0, 4, 500, score=-5.0) for i in range(n_starved)]
    for r in busy + starved:
        sched.add(r, 0.0)
    sched.schedule(0.0)
    return sched, busy, starved


def test_promoted_requests_displace_the_worst_ranked_and_keep_the_slot_for_their_quantum():
    sched = Scheduler(make_policy("ltr", max_preemptions=0), 2,
                      starvation=StarvationConfig(slack_s=1.5, quantum_s=0.5, max_promoted_share=1.0,
                                                  learn_thin_classes=False, slack_reserve=0.0))
    old = Request("old", 0.0, 4, 50, score=-5.0)
    sched.add(old, 0.0)
    runners = [Request(f"run{i}", 0.0, 4, 50, score=5.0 + i) for i in range(2)]
    for r in runners:
        sched.add(r, 0.0)
    assert sched.schedule(0.0).admit == [runners[1], runners[0]]  # ranked first
    t = starve(sched, runners, 0.0, 1.05)
    decision = sched.schedule(t)
    assert old.promoted and old.promotions == 1
    # it took the slot of the worse-ranked runner, past the policy's cap of 0 preemptions
    assert decision.preempt == [] and sched.get("old") in sched.running and runners[0].preemptions == 1
    assert runners[0].preemptions_past_cap == 1
    newcomer = Request("new", t, 4, 50, score=100.0)  # better ranked than anyone
    sched.add(newcomer, t)
    t = starve(sched, [old, runners[1]], t, t + 0.4)  # within its quantum nobody displaces it
    assert old in sched.running and old.promoted
    t = starve(sched, [old, runners[1]], t, t + 0.3)  # quantum over: back in rank order, the newcomer takes it
    assert not old.promoted and old in sched.waiting and newcomer in sched.running
    assert old.promotions == 1


def _one_old_request_behind_two_runners(config: StarvationConfig):
    """Two slots held by two better-ranked requests and one old, worst-ranked request waiting behind them:
    (scheduler, the old request, all three)."""
    sched = Scheduler(make_policy("ltr", max_preemptions=0), 2, starvation=config)
    old = Request("old", 0.0, 4, 500, score=-5.0)
    everyone = [old, *(Request(f"run{i}", 0.0, 4, 500, score=5.0 + i) for i in range(2))]
    for r in everyone:
        sched.add(r, 0.0)
    sched.schedule(0.0)
    return sched, old, everyone


@pytest.mark.parametrize("run_to_end_after", [2, 0])
def test_a_request_promoted_twice_keeps_its_slot_until_it_finishes(run_to_end_after):
    config = StarvationConfig(slack_s=1.5, quantum_s=0.5, max_promoted_share=1.0, run_to_end_after=run_to_end_after,
                              slack_reserve=0.0, learn_thin_classes=False)
    sched, old, everyone = _one_old_request_behind_two_runners(config)
    t = starve(sched, everyone, 0.0, 1.2)
    assert old.promotions == 1 and old in sched.running
    t = starve(sched, everyone, t, t + 1.0)  # quantum over: back in rank order, the runner it displaced returns
    assert old in sched.waiting and not old.promoted
    t = starve(sched, everyone, t, t + 1.2)  # waited past the bound again
    assert old.promotions == 2 and (old in sched.running or not run_to_end_after)
    newcomer = Request("new", t, 4, 500, score=100.0)
    sched.add(newcomer, t)
    everyone.append(newcomer)
    t = starve(sched, everyone, t, t + 3.0)  # long past its quantum, a better-ranked request waiting
    if run_to_end_after:
        assert old in sched.running and old.promoted and old.preemptions == 1
        sched.finish(old, t)
        assert newcomer in sched.schedule(t).admit  # its slot goes back to the ranking
    else:
        assert old.promotions > 2 and old.preemptions > 2  # promoted and displaced, again and again


def test_a_promoted_request_of_a_class_with_too_few_finished_requests_runs_to_its_end():
    """learn_thin_classes: the cost model knows nothing of the class the ranking defers, so a promoted request of
    it keeps its slot past its quantum (the model learns that class from a request that started by age, not by
    length); only min_finished_per_class of a class at a time, and none once the class has enough finished
    requests."""
    config = StarvationConfig(slack_s=1.5, quantum_s=0.5, max_promoted_share=1.0)
    sched, old, everyone = _one_old_request_behind_two_runners(config)
    t = starve(sched, everyone, 0.0, 1.2)
    assert old.promotions == 1 and old in sched.running and old._learner
    newcomer = Request("new", t, 4, 500, score=100.0)
    sched.add(newcomer, t)
    everyone.append(newcomer)
    t = starve(sched, everyone, t, t + 3.0)  # long past its quantum, a better-ranked request waiting
    assert old in sched.running and old.promoted and old.promotions == 1
    sched.finish(old, t)
    assert newcomer in sched.schedule(t).admit

    model = WorkModel(min_events=2)  # a class with enough finished requests: promotions are quanta again
    for i in range(4):
        model.arrived(-5.0)
        model.started(i, -5.0)
    model.refresh(lambda i: (1.0 + i, True))
    assert model.finished_in_class(model.score_class(-5.0)) == 4


@pytest.mark.parametrize("wanted", [8, 32])
def test_no_more_requests_of_a_class_run_to_their_end_for_the_model_than_it_needs(wanted):
    """min_finished_per_class: a thin class is learned from that many of its promoted requests, no more."""
    config = StarvationConfig(slack_s=0.5, max_promoted_share=1.0, min_finished_per_class=wanted)
    sched, busy, starved = busy_and_starved(config, 40, 40, 40)
    starve(sched, busy, 0.0, 1.0)
    assert all(r.promoted for r in starved)
    learners = [r for r in starved if r._learner]
    assert len(learners) == wanted  # the rest get a quantum, as usual
    assert learners == starved[:len(learners)]  # the first promoted, i.e. the oldest


def test_runs_to_the_end_leave_a_promoted_slot_to_the_promotions_of_a_quantum():
    """Requests kept in their slots to their ends hold at most all but one of the promoted slots, so a request
    promoted past its bound gets its token within quanta, not after someone's whole run. Four slots, two of them
    for promotions: of three thin-class requests promoted at once, one runs to its end (a learner), and all three
    have a token within a second of their promotion."""
    sched, busy, starved = busy_and_starved(StarvationConfig(slack_s=0.5, quantum_s=0.25), 4, 4, 3)
    t = starve(sched, busy, 0.0, 0.8)
    assert all(r.promoted for r in starved)
    t = starve(sched, [*busy, *starved], t, t + 1.0)
    assert [r._runs_to_end for r in starved] == [True, False, False]
    assert all(r.generated >= 1 for r in starved)


def test_learning_runs_stop_at_their_share_of_the_engine_time():
    """learn_share: a request runs to its end for the model only while those have taken at most this share of the
    engine's time so far (on an engine of a few slots each one is a large share of it). Eight slots, all of them
    for promotions: the slots are not what stops them."""
    def learners(share):
        sched, busy, old = busy_and_starved(
            StarvationConfig(slack_s=0.5, max_promoted_share=1.0, learn_share=share, slack_reserve=0.0), 8, 8, 2)
        t = starve(sched, busy, 0.0, 0.8)  # the first one is promoted: a learner (none has run yet)
        late = Request("late", t, 4, 500, score=-5.0)
        sched.add(late, t)
        t = starve(sched, [*busy, *old], t, t + 2.0)  # it runs; then the late one is promoted
        assert late.promoted
        return [r._learner for r in (*old, late)]

    assert learners(1.0) == [True, True, True]
    assert learners(0.25) == [True, True, False]  # the first two took half the engine's time by then
    assert learners(0.0) == [False, False, False]


def test_with_no_eviction_allowed_and_no_requeue_a_promotion_waits_for_a_free_slot_and_runs_to_its_end():
    config = StarvationConfig(slack_s=1.0, max_promoted_share=1.0, preempt_past_cap=False,
                              requeue_after_quantum=False)
    sched = Scheduler(make_policy("ltr", max_preemptions=0), 2, starvation=config)  # evictions: none
    old = [Request(f"old{i}", 0.0, 4, 50, score=-5.0) for i in range(2)]
    for r in old:
        sched.add(r, 0.0)
    runners = [Request(f"run{i}", 0.0, 4, 50, score=5.0) for i in range(2)]
    for r in runners:
        sched.add(r, 0.0)
    assert sched.schedule(0.0).admit == runners
    t = starve(sched, runners, 0.0, 3.0)
    assert all(r.promoted for r in old) and [r.request_id for r in sched.waiting] == ["old0", "old1"]
    newcomer = Request("new", t, 4, 50, score=100.0)
    sched.add(newcomer, t)
    assert sched.schedule(t).preempt == []  # nobody jumps the promoted ones by preemption
    sched.finish(runners[0], t)
    assert sched.schedule(t).admit == [old[0]]  # in the order they were promoted
    sched.finish(runners[1], t)
    assert sched.schedule(t).admit == [old[1]]
    t = starve(sched, old, t, t + 5.0)  # long past any quantum: they keep their slots
    assert all(r in sched.running for r in old) and newcomer in sched.waiting


def test_promoted_share_of_slots_is_capped_but_slots_never_idle():
    config = StarvationConfig(slack_s=0.5, max_promoted_share=0.5, preempt_past_cap=False)
    sched = Scheduler(make_policy("ltr", max_preemptions=0), 4, starvation=config)
    starved = [Request(f"s{i}", 0.0, 4, 50, score=-5.0) for i in range(4)]
    for r in starved:
        sched.add(r, 0.0)
    busy = [Request(f"b{i}", 0.0, 4, 50, score=5.0) for i in range(4)]
    for r in busy:
        sched.add(r, 0.0)
    sched.schedule(0.0)
    t = starve(sched, busy, 0.0, 1.0)
    assert all(r.promoted for r in starved)
    fresh = [Request(f"f{i}", t, 4, 50, score=5.0) for i in range(4)]
    for r in fresh:
        sched.add(r, t)
    for r in busy:
        sched.finish(r, t)
    admitted = sched.schedule(t).admit
    assert sum(r.promoted for r in admitted) == 2 and len(admitted) == 4  # half the slots, the rest ranked
    for r in [r for r in admitted if not r.promoted]:
        sched.finish(r, t)
    for r in fresh:
        if r in sched.waiting:
            sched.cancel(r.request_id, t)
    admitted = sched.schedule(t).admit  # no ranked request waits: promoted ones take the free slots anyway
    assert len(admitted) == 2 and all(r.promoted for r in admitted)


def learned(observations, **kwargs):
    """A WorkModel that saw requests ``(score, cost_s, finished)`` arrive and start, in that order, refreshed after
    each (as the scheduler refreshes it after finishes)."""
    model = WorkModel(**kwargs)
    for i, (score, _, _) in enumerate(observations):
        model.arrived(score)
        model.started(i, score)
        model.refresh(lambda j: observations[j][1:])
    return model


def test_work_model_counts_unfinished_requests_as_lower_bounds():
    # 8 requests of one score started; the 4 cheapest finished (1..4 s), the other 4 have had 4.5 s so far: the
    # finished ones alone say 2.5 s; Kaplan-Meier: S = 7/8, 6/8, 5/8, 4/8 after 1, 2, 3, 4 s, up to 4.5 s
    obs = [(0.0, float(c), True) for c in (1, 2, 3, 4)] + [(0.0, 4.5, False)] * 4
    model = learned(obs, min_events=4)
    assert model.ready
    assert model.estimate(0.0) == pytest.approx(1 + 7 / 8 + 6 / 8 + 5 / 8 + 0.5 * 4 / 8)
    # the expected rest of one that has had 2.5 s: (0.5 x 6/8 + 5/8 + 0.5 x 4/8) / (6/8)
    assert model.remaining(0.0, 2.5) == pytest.approx((0.375 + 0.625 + 0.25) / 0.75)
    assert model.remaining(0.0, 9.0) == 0.0  # past anything seen: it errs low
    assert not learned(obs[:3] + obs[4:], min_events=4).ready  # too few finished


def test_work_model_keeps_the_requests_the_ranking_rarely_starts():
    # 8 requests ranked last (score -1, 10 s each) started early and finished; then 600 ranked first (1 s each):
    # a window of recent requests would have forgotten the long ones, each score class keeps its own last starts
    obs = [(-1.0, 10.0, True)] * 8 + [(1.0, 1.0, True)] * 600
    model = learned(obs, bins=2, per_class=64, min_events=4)
    assert model.estimate(-1.0) == pytest.approx(10.0)
    assert model.estimate(1.0) == pytest.approx(1.0)
    assert model.remaining(-1.0, 4.0) == pytest.approx(6.0)


def test_work_model_continues_a_censored_tail_with_the_next_shorter_class():
    # the long class: 16 finished at 2 s, 16 still running at 3 s (S = 0.5 there); the short class: costs 1..8 s.
    # Past 3 s the long class follows the short one's tail, capped at its own 0.5
    obs = [(-1.0, 2.0, True)] * 16 + [(-1.0, 3.0, False)] * 16 + [(1.0, float(c), True) for c in range(1, 9)] * 4
    model = learned(obs, bins=2, min_events=4)
    short_tail = sum(min(0.5, 1 - c / 8) for c in range(3, 8))  # the short class's S on [3, 8): 5/8 ... 1/8
    assert model.estimate(-1.0) == pytest.approx(2 + 0.5 * 1 + short_tail)
    flat = learned([(0.0, 1.0, True), (0.0, 3.0, True)], min_events=2)
    assert flat.estimate(0.0) == pytest.approx(2.0)
    # what FCFS still runs beside a new request: (slots - 1) x E[w^2] / (2 E[w])
    assert flat.fcfs_tail(3) == pytest.approx(2 * (1 + 9) / (2 * 4))


def test_the_unstarted_work_comes_with_the_variance_of_its_sum():
    # two classes: the long one costs 10 or 30 s (mean 20, variance 100), the short one 1 or 3 s (mean 2, variance 1)
    obs = [(-1.0, 10.0, True), (-1.0, 30.0, True)] * 8 + [(1.0, 1.0, True), (1.0, 3.0, True)] * 8
    model = learned(obs, bins=2, min_events=4)
    waiting = SortedList([-1.0, -1.0, 1.0, 1.0, 1.0])  # the unstarted requests' scores
    work, variance = model.unstarted_work(waiting)
    assert work == pytest.approx(2 * 20 + 3 * 2)
    assert variance == pytest.approx(2 * 100 + 3 * 1)


def test_fcfs_delay_is_estimated_below_its_expectation_by_estimate_sds():
    """On a few slots a handful of long requests decide FCFS's delay; the estimate takes ``estimate_sds`` standard
    deviations of the unstarted work off the expected backlog, so it runs ahead of the real delay less often."""
    obs = [(0.0, 1.0, True), (0.0, 3.0, True)] * 8  # every request costs 1 or 3 s: mean 2, variance 1

    def delay(sds):
        config = StarvationConfig(estimate_sds=sds, min_finished_per_class=16)  # the 16 requests below
        sched = Scheduler(make_policy("ltr"), 1, starvation=config)
        model = sched._work_model
        for i, (score, _, _) in enumerate(obs):
            model.arrived(score)
            model.started(i, score)
        model.refresh(lambda j: obs[j][1:])
        for i in range(16):  # 16 requests waiting, none started
            sched.add(Request(f"w{i}", 0.0, 4, 8, score=0.0), 0.0)
        return sched.fcfs_delay_s()

    assert delay(0.0) == pytest.approx(16 * 2.0)  # one slot: no tail running beside the newcomer
    assert delay(1.0) == pytest.approx(16 * 2.0 - 4.0)  # sqrt(16 x 1)
    assert delay(2.0) == pytest.approx(16 * 2.0 - 8.0)


def test_a_momentary_spike_in_the_estimate_does_not_raise_the_bound():
    sched = Scheduler(make_policy("ltr"), 2, starvation=StarvationConfig(slack_s=10.0, quantum_s=1.0,
                                                                          slack_reserve=0.0))
    sched.add(Request("old", 0.0, 4, 50, score=0.0), 0.0)  # waits throughout: the bound's window starts at 0
    delays = iter([5.0] * 10 + [50.0] + [6.0] * 20)  # a model refresh's spike at t = 5 s
    sched.fcfs_delay_s = lambda: next(delays)
    bounds = [sched.promotion_wait_s(0.5 * i) for i in range(31)]
    assert bounds[0] == pytest.approx(5.0 + 9.0)  # the delay, plus the slack less a quantum
    assert max(bounds) == pytest.approx(6.0 + 9.0)  # the spike never counts, the steady 6 s does


def test_the_slack_is_slack_s_or_a_share_of_fcfss_delay_whichever_is_more():
    """The estimate of FCFS's delay errs by a share of it, so the slack grows with the delay: under a 20-s delay
    the 10-s slack_s holds, under a 100-s one a quarter of it (25 s). The rule aims slack_reserve (a tenth) of
    the slack early."""
    sched = Scheduler(make_policy("ltr"), 2, starvation=StarvationConfig(slack_s=10.0, slack_share=0.25,
                                                                          quantum_s=1.0))
    sched.add(Request("old", 0.0, 4, 50, score=0.0), 0.0)  # waits throughout: the bound keeps its peak
    delays = iter([20.0] * 12 + [100.0] * 12)
    sched.fcfs_delay_s = lambda: next(delays)
    bounds = [sched.promotion_wait_s(0.5 * i) for i in range(24)]
    assert bounds[0] == pytest.approx(20.0 + 0.9 * 10.0 - 1.0)
    assert bounds[-1] == pytest.approx(100.0 + 0.9 * 25.0 - 1.0)
    # slack_share 0: slack_s alone, as before the share existed
    assert StarvationConfig(slack_s=10.0, slack_share=0.0).slack_for(100.0) == 10.0
    with pytest.raises(ValueError, match="slack_share"):
        StarvationConfig(slack_share=-0.1)
    with pytest.raises(ValueError, match="estimate_sds"):
        StarvationConfig(estimate_sds=float("nan"))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="slack_reserve"):
            StarvationConfig(slack_reserve=bad)


def test_rule_and_share_are_validated():
    with pytest.raises(ValueError, match="rule must be one of fcfs-slack, threshold"):
        StarvationConfig(rule="soon")
    with pytest.raises(ValueError, match="max_promoted_share"):
        StarvationConfig(max_promoted_share=0.0)
    assert StarvationConfig(max_promoted_share=0.1).promoted_slots(4) == 1


def test_a_promoted_request_runs_to_its_end_only_while_one_request_is_a_small_part_of_fcfss_delay():
    """run_to_end_share: keeping a promoted request in its slot to its end (run_to_end_after, learn_thin_classes)
    runs work out of rank order that every waiting request waits for; it happens only while the largest cost the
    model has seen is at most this share of FCFS's delay. Two slots: two requests of 15 engine seconds each run
    alone first (the model sees what such a request costs), then the overload, with a third of them that the ranker
    puts last. FCFS's delay stays under 16 x 15 s: under the default share the third is back in rank order after
    each quantum, its second included; with the share at 1 it runs to its end at its second promotion (FCFS's
    delay is past 15 s by then)."""
    def huge(t, score):
        return TraceEntry(arrival_time=t, prompt_len=16, output_len=3000, score=score, bucket=0)

    start = 40.0
    trace = [huge(0.0, 10.0), huge(0.0, 10.0), huge(start + 30.0, -10.0),
             *(e._replace(arrival_time=e.arrival_time + start) for e in overload_trace())]
    config = StarvationConfig(slack_s=5.0, learn_thin_classes=False, max_promoted_share=1.0)

    def third(share):
        result = simulate(trace, Scheduler(make_policy("ltr"), 2, starvation=replace(config, run_to_end_share=share)),
                          ConstantStep())
        return next(r for r in result.records if r.true_output_len == 3000 and r.arrival_time > 0)

    requeued, whole = third(config.run_to_end_share), third(1.0)
    assert requeued.promotions == whole.promotions == config.run_to_end_after
    assert whole._runs_to_end and whole.preemptions == 1  # displaced once by the ranking, never after
    assert not requeued._runs_to_end and requeued.preemptions > whole.preemptions


def test_ranker_passes_and_idle_time_are_no_ones_cost():
    """fcfs-slack counts the interval that ends with a request's add (its ranker pass) as engine time but as no
    request's cost, since FCFS, whose delay the cost model estimates, ranks nothing; and when the engine had nothing
    to do since the last event that interval was idle: not even engine time."""
    sched = Scheduler(make_policy("ltr"), 2, starvation=StarvationConfig())
    first = Request("first", 0.0, 4, 2, score=0.0)
    sched.add(first, 0.0)
    sched.schedule(0.0)
    sched.on_token(first, 0.1)  # its prefill: its own cost
    sched.on_token(first, 0.2)  # a decode step, shared by the 2 slots
    sched.finish(first, 0.2)
    assert first._work_s == pytest.approx(0.15)
    assert sched._engine_s == pytest.approx(0.2)
    later = Request("later", 100.0, 4, 2, score=0.0)
    sched.add(later, 100.05)  # arrived after 99.8 s of idling; its ranker pass took the last 0.05 s
    assert sched._engine_s == pytest.approx(0.2)
    other = Request("other", 100.0, 4, 2, score=0.0)
    sched.add(other, 100.1)  # the engine is busy ranking now: this interval is a ranker pass
    assert sched._engine_s == pytest.approx(0.25)
    assert later._work_s == other._work_s == 0.0
