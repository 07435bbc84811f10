"""Unit tests of the rank scheduler: Request timing, policy construction, Scheduler decisions, starvation."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from ltr_jax.scheduler import POLICY_NAMES, Request, RequestState, Scheduler, StarvationConfig, make_policy
from ltr_jax.scheduler.policies import policy_parameters


def req(i, arrival=0.0, prompt=10, out=5, score=0.0, bucket=0, true_len=None):
    return Request(f"r{i}", arrival, prompt, max_tokens=out, score=score, true_output_len=true_len, bucket=bucket)


def run_tokens(sched, reqs, now):
    for r in reqs:
        sched.on_token(r, now)


# ---------------------------------------------------------------------- package hygiene
def test_scheduler_package_never_imports_jax():
    code = (
        "import sys\n"
        "import ltr_jax.scheduler, ltr_jax.sim.simulator, ltr_jax.engine.preemption, ltr_jax.scheduler.metrics\n"
        "import ltr_jax.sim.trace\n"
        "import ltr_jax.sim.step_time, ltr_jax.sim.decision_bench\n"
        "from ltr_jax.sim.trace import synthesize_scores\n"
        "synthesize_scores([1, 5, 20, 80, 300], 0.6)\n"
        "bad = sorted(m for m in sys.modules if m == 'jax' or m.startswith(('jax.', 'jaxlib', 'flax')))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- Request
def test_request_timing_properties():
    r = req(0, arrival=1.0, prompt=7, out=4)
    assert r.ttft is None and r.max_waiting_time is None and r.context_len == 7
    r.state = RequestState.RUNNING
    for t in (1.5, 1.6, 3.0, 3.2):
        r.record_token(t)
    r.finish_time = 3.2
    assert r.generated == 4 and r.context_len == 11
    assert r.ttft == pytest.approx(0.5)
    assert r.max_token_gap == pytest.approx(1.4)
    assert r.max_waiting_time == pytest.approx(1.4)
    assert r.tpot == pytest.approx((3.2 - 1.5) / 3)
    assert r.latency == pytest.approx(2.2)
    assert r.normalized_latency == pytest.approx(2.2 / 4)
    assert r.token_times == [1.5, 1.6, 3.0, 3.2]


def test_request_rejects_bad_fields():
    with pytest.raises(ValueError, match="prompt_len"):
        Request("a", 0.0, 0, 5)
    with pytest.raises(ValueError, match="max_tokens"):
        Request("a", 0.0, 3, 0)
    with pytest.raises(ValueError, match="score"):
        Request("a", 0.0, 3, 5, score=float("nan"))


# ---------------------------------------------------------------------- policies
def test_make_policy_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError) as err:
        make_policy("shortest-first")
    message = str(err.value)
    assert "shortest-first" in message
    for name in POLICY_NAMES:
        assert name in message


def test_make_policy_unknown_parameter_is_named():
    with pytest.raises(ValueError) as err:
        make_policy("ltr", max_premptions=3)
    assert "max_premptions" in str(err.value) and "max_preemptions" in str(err.value)
    with pytest.raises(ValueError, match="max_preemptions"):
        make_policy("ltr", max_preemptions=-1)
    assert set(policy_parameters("ltr-rescore")) >= {"window", "context_cost", "max_preemptions", "margin"}


def test_all_policy_names_build():
    assert set(POLICY_NAMES) == {"fcfs", "ltr", "ltr-rescore", "classify", "oracle-sjf", "oracle-srtf"}
    for name in POLICY_NAMES:
        assert make_policy(name).name == name


@pytest.mark.parametrize("name", ["oracle-sjf", "oracle-srtf"])
def test_oracle_policies_need_true_length(name):
    sched = Scheduler(make_policy(name), 2)
    with pytest.raises(ValueError, match="true_output_len"):
        sched.add(req(0), 0.0)


# ---------------------------------------------------------------------- Scheduler basics
def test_fcfs_admits_in_arrival_order_and_never_exceeds_slots():
    sched = Scheduler("fcfs", 2)
    reqs = [req(i, arrival=0.1 * i, score=i) for i in range(5)]
    for r in reqs:
        sched.add(r, 1.0)
    d = sched.schedule(1.0)
    assert d.admit == reqs[:2] and d.preempt == []
    assert sched.running == reqs[:2] and list(sched.waiting) == reqs[2:]
    assert all(r.state is RequestState.RUNNING for r in reqs[:2])
    run_tokens(sched, reqs[:2], 1.1)
    sched.finish(reqs[0], 1.2)
    d = sched.schedule(1.2)
    assert d.admit == [reqs[2]] and d.preempt == [] and sched.num_running == 2


def test_ltr_orders_by_score_and_preempts_lowest_ranked():
    sched = Scheduler(make_policy("ltr", max_preemptions=5), 2)
    a, b = req(0, score=1.0), req(1, score=2.0)
    sched.add(a, 0.0)
    sched.add(b, 0.0)
    assert sched.schedule(0.0).admit == [b, a]  # higher score first
    run_tokens(sched, [a, b], 0.1)
    run_tokens(sched, [a, b], 0.2)
    c = req(2, arrival=0.25, score=1.5)
    sched.add(c, 0.3)
    d = sched.schedule(0.3)
    assert d.preempt == [a] and d.admit == [c]
    assert a.state is RequestState.WAITING and a.generated == 2 and a.context_len == 12 and a.preemptions == 1
    assert sched.num_preemptions == 1 and set(sched.running) == {b, c}
    worse = req(3, arrival=0.3, score=0.5)
    sched.add(worse, 0.3)
    assert sched.schedule(0.4).admit == []  # nobody better than the running ones
    assert list(sched.waiting) == [a, worse]


def test_margin_blocks_small_improvements():
    sched = Scheduler(make_policy("ltr", margin=1.0), 1)
    a = req(0, score=1.0)
    sched.add(a, 0.0)
    sched.schedule(0.0)
    sched.add(req(1, score=1.9), 0.0)
    assert sched.schedule(0.1).preempt == []
    better = req(2, score=2.5)
    sched.add(better, 0.1)
    assert sched.schedule(0.2).admit == [better]


def test_preemption_limit_is_respected():
    sched = Scheduler(make_policy("ltr", max_preemptions=1), 1)
    victim = req(0, score=0.0)
    sched.add(victim, 0.0)
    sched.schedule(0.0)
    first = req(1, score=5.0, out=1)
    sched.add(first, 0.0)
    assert sched.schedule(0.1).preempt == [victim]
    sched.on_token(first, 0.2)
    sched.finish(first, 0.2)
    assert sched.schedule(0.3).admit == [victim]
    sched.add(req(2, score=9.0), 0.3)
    assert sched.schedule(0.4).preempt == []  # victim used its one preemption
    assert victim.state is RequestState.RUNNING and victim.preemptions == 1


def test_fcfs_never_preempts_without_starvation_control():
    sched = Scheduler("fcfs", 1)
    a = req(0, arrival=5.0)
    sched.add(a, 5.0)
    sched.schedule(5.0)
    sched.add(req(1, arrival=0.0), 5.0)  # earlier arrival, added late
    assert sched.schedule(5.1).preempt == []


def test_classify_orders_by_bucket_then_arrival():
    sched = Scheduler("classify", 3)
    reqs = [req(0, arrival=0.0, bucket=2), req(1, arrival=0.1, bucket=0), req(2, arrival=0.2, bucket=2),
            req(3, arrival=0.3, bucket=0)]
    for r in reqs:
        sched.add(r, 0.5)
    assert sched.schedule(0.5).admit == [reqs[1], reqs[3], reqs[0]]


def test_max_prefill_tokens_budget_admits_at_least_one():
    sched = Scheduler("fcfs", 4, max_prefill_tokens=25)
    reqs = [req(i, arrival=i, prompt=p) for i, p in enumerate((30, 10, 10, 10))]
    for r in reqs:
        sched.add(r, 10.0)
    assert sched.schedule(10.0).admit == [reqs[0]]  # over budget alone, admitted anyway
    assert sched.schedule(10.1).admit == [reqs[1], reqs[2]]  # 10 + 10 <= 25, a third would be 30
    assert sched.schedule(10.2).admit == [reqs[3]]


def test_cancel_and_state_errors():
    sched = Scheduler("ltr", 1)
    a, b = req(0, score=1.0), req(1)
    sched.add(a, 0.0)
    sched.add(b, 0.0)
    with pytest.raises(ValueError, match="already added"):
        sched.add(a, 0.0)
    with pytest.raises(ValueError, match="duplicate request_id"):
        sched.add(req(0), 0.0)
    sched.schedule(0.0)
    with pytest.raises(ValueError, match="only running"):
        sched.on_token(b, 0.1)
    with pytest.raises(ValueError, match="only running"):
        sched.finish(b, 0.1)
    assert sched.cancel("r1", 0.2) is b and b.state is RequestState.CANCELLED and sched.num_waiting == 0
    assert sched.cancel("r0", 0.3) is a and sched.num_running == 0
    assert sched.cancel("r0", 0.3) is None and sched.cancel("nope", 0.3) is None
    sched.schedule(0.5)
    with pytest.raises(ValueError, match="back in time"):
        sched.schedule(0.1)


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="num_slots"):
        Scheduler("fcfs", 0)
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        Scheduler("fcfs", 1, max_prefill_tokens=0)
    with pytest.raises(ValueError, match="threshold_s"):
        StarvationConfig(rule="threshold", threshold_s=0)


# ---------------------------------------------------------------------- starvation control
def test_starved_request_is_promoted_preempts_and_is_demoted_after_quantum():
    starvation = StarvationConfig(rule="threshold", threshold_s=1.0, quantum_s=0.5)
    sched = Scheduler(make_policy("ltr", max_preemptions=None), 1, starvation=starvation)
    long_job = req(0, score=-5.0)
    sched.add(long_job, 0.0)
    sched.schedule(0.0)
    short = req(1, score=5.0)
    sched.add(short, 0.0)
    assert sched.schedule(0.0).preempt == [long_job]
    t = 0.0
    while t < 1.0:  # short keeps the slot; long_job waits since its wait clock started (arrival, no token)
        t = round(t + 0.25, 2)
        sched.on_token(short, t)
        d = sched.schedule(t)
        assert d.admit == [] and not long_job.promoted
    t = 1.25  # wait 1.25 s > threshold: promoted, displaces the better-scored short one
    sched.on_token(short, t)
    d = sched.schedule(t)
    assert long_job.promoted and sched.num_promotions == 1 and long_job.promotions == 1
    assert d.preempt == [short] and d.admit == [long_job]
    better = req(2, score=50.0)
    sched.add(better, t)
    sched.on_token(long_job, 1.3)
    assert sched.schedule(1.3).preempt == []  # promoted are never displaced by non-promoted
    sched.on_token(long_job, 1.4)
    assert sched.schedule(1.4).preempt == []  # quantum counted from starving at 0 + 1.0 runs to 1.5
    sched.on_token(long_job, 1.5)
    d = sched.schedule(1.5)
    assert not long_job.promoted  # demoted, then displaced by the best waiting request
    assert d.preempt == [long_job] and d.admit == [better]


@pytest.mark.parametrize("requeue", [False, True])
def test_under_a_cap_of_zero_an_expired_promotion_is_requeued_only_when_asked(requeue):
    starvation = StarvationConfig(rule="threshold", threshold_s=1.0, quantum_s=0.5, requeue_after_quantum=requeue)
    sched = Scheduler(make_policy("ltr", max_preemptions=0), 1, starvation=starvation)
    ranked_last, first = req(0, score=-5.0, out=50), req(1, score=5.0, out=50)
    sched.add(ranked_last, 0.0)
    sched.add(first, 0.0)
    assert sched.schedule(0.0).admit == [first]
    sched.on_token(first, 1.1)
    d = sched.schedule(1.1)  # waited 1.1 s > threshold: promoted, and evicts past the cap of 0
    assert d.preempt == [first] and d.admit == [ranked_last] and first.preemptions_past_cap == 1
    sched.on_token(ranked_last, 1.2)
    assert sched.schedule(1.2).preempt == []  # within its quantum (starved at 1.0, until 1.5)
    sched.on_token(ranked_last, 1.5)
    d = sched.schedule(1.5)
    assert not ranked_last.promoted  # demoted either way
    if not requeue:  # it keeps the slot to its end: the cap of 0 protects it
        assert d.preempt == [] and d.admit == []
        return
    assert d.preempt == [ranked_last] and d.admit == [first]  # back in rank order: the better one resumes
    assert ranked_last.preemptions_past_cap == 1 and ranked_last.state is RequestState.WAITING
    sched.on_token(first, 2.4)
    assert sched.schedule(2.4).preempt == []  # its wait restarted at its last token (1.5): not starved yet
    sched.on_token(first, 2.6)
    d = sched.schedule(2.6)  # waited 1.1 s since its last token: promoted again, the bound holds
    assert ranked_last.promotions == 2 and d.admit == [ranked_last] and d.preempt == [first]
    # a request that entered in rank order is not requeued: the cap still protects `first` once it runs again
    sched.on_token(ranked_last, 2.7)
    sched.on_token(ranked_last, 3.1)
    assert sched.schedule(3.1).admit == [first]
    better = req(2, arrival=3.1, score=50.0)
    sched.add(better, 3.1)
    sched.on_token(first, 3.2)
    assert sched.schedule(3.2).preempt == []


def test_promoted_requests_ordered_by_when_they_starved():
    sched = Scheduler("ltr", 1, starvation=StarvationConfig(rule="threshold", threshold_s=1.0, quantum_s=10.0))
    runner = req(0, score=9.0)
    sched.add(runner, 0.0)
    sched.schedule(0.0)
    late, early = req(1, arrival=0.5, score=5.0), req(2, arrival=0.2, score=-5.0)
    sched.add(late, 0.5)
    sched.add(early, 0.5)
    sched.on_token(runner, 2.0)
    d = sched.schedule(2.0)
    assert late.promoted and early.promoted
    assert d.admit == [early] and d.preempt == [runner]
    assert list(sched.waiting) == [late, runner]


def test_starvation_disabled_flag():
    sched = Scheduler("ltr", 1, starvation=StarvationConfig(rule="threshold", threshold_s=0.1, quantum_s=0.1,
                                                            enabled=False))
    assert sched.starvation is None


# ---------------------------------------------------------------------- progress-dependent policies
def test_oracle_srtf_reorders_running_requests_by_remaining_length():
    sched = Scheduler(make_policy("oracle-srtf", max_preemptions=None), 1)
    a = req(0, true_len=10)
    sched.add(a, 0.0)
    sched.schedule(0.0)
    for i in range(6):
        sched.on_token(a, 0.1 * (i + 1))  # a has 4 tokens left
    b = req(1, true_len=5)
    sched.add(b, 0.6)
    assert sched.schedule(0.6).preempt == []  # 5 > 4 remaining
    c = req(2, true_len=3)
    sched.add(c, 0.6)
    d = sched.schedule(0.7)
    assert d.preempt == [a] and d.admit == [c]


def _finish_one(sched, score, length, now):
    r = Request(f"cal-{score}-{now}", now, 5, max_tokens=length, score=score)
    sched.add(r, now)
    d = sched.schedule(now)
    assert r in d.admit
    for _ in range(length):
        sched.on_token(r, now)
    sched.finish(r, now)


def test_ltr_rescore_calibrates_and_predicts_remaining_length():
    policy = make_policy("ltr-rescore", min_samples=4, window=8, refresh_every=100, max_preemptions=None,
                         context_cost=0.0)
    sched = Scheduler(policy, 1)
    # scores rank lengths perfectly: score s -> length 10 * (5 - s)
    for s in (4.0, 3.0, 2.0, 1.0):
        _finish_one(sched, s, int(10 * (5 - s)), 0.0)
    assert policy.calibrated
    assert policy.estimated_length(4.0) == pytest.approx(10.0)
    assert policy.estimated_length(1.0) == pytest.approx(40.0)
    assert policy.estimated_length(2.5) == pytest.approx(25.0)  # interpolated between neighbours
    # fresh requests keep the ranker's order
    r_hi, r_lo = req(10, score=3.5), req(11, score=1.5)
    assert policy.priority(r_hi) < policy.priority(r_lo)
    # residual length against a brute-force recomputation over the recorded ratios
    ratios = sorted(policy._calibration.ratios)
    r = req(12, score=2.0)
    est = policy.estimated_length(2.0)
    for g in (0, 5, 15, 29, 200):
        r.generated = g
        longer = [x for x in ratios if x > g / est]
        expected = est * (sum(longer) / len(longer) - g / est) if longer else 0.5 * g
        assert policy.priority(r) == pytest.approx(expected)


def test_ltr_rescore_displacement_pays_for_the_victims_context():
    policy = make_policy("ltr-rescore", min_samples=4, refresh_every=100, max_preemptions=None, context_cost=1.0)
    sched = Scheduler(policy, 1)
    for s in (4.0, 3.0, 2.0, 1.0):
        _finish_one(sched, s, int(10 * (5 - s)), 0.0)
    victim = Request("v", 1.0, 100, max_tokens=100, score=1.0)  # expected ~40 tokens, 100-token context
    sched.add(victim, 1.0)
    sched.schedule(1.0)
    sched.add(req(20, arrival=1.0, score=4.0), 1.0)  # expected ~10: saves ~30 tokens < 100-token re-prefill
    assert sched.schedule(1.1).preempt == []
    policy.context_cost = 0.1  # now 30 > 10
    assert sched.schedule(1.2).preempt == [victim]


def test_ltr_rescore_reranks_waiting_requests_when_it_calibrates():
    policy = make_policy("ltr-rescore", min_samples=2, window=4, refresh_every=1000)
    sched = Scheduler(policy, 1)
    blocker = req(29, score=100.0)
    sched.add(blocker, 0.0)
    sched.schedule(0.0)
    waiting = [req(30 + i, score=s) for i, s in enumerate((0.0, 3.0, 1.5))]
    for w in waiting:
        sched.add(w, 0.0)
    assert list(sched.waiting) == [waiting[1], waiting[2], waiting[0]]
    assert [w._rank[1] for w in sched.waiting] == [-3.0, -1.5, 0.0]  # score units before calibration
    sched.finish(blocker, 0.1)
    for i, (score, length) in enumerate(((50.0, 10), (40.0, 30), (30.0, 60))):
        _finish_one(sched, score, length, 0.2 + i)
    assert policy.calibrated
    # re-ranked in token units, same (score) order, every cached rank equal to a fresh priority
    assert list(sched.waiting) == [waiting[1], waiting[2], waiting[0]]
    assert all(w._rank[1] == policy.priority(w) > 0 for w in sched.waiting)


# ---------------------------------------------------------------------- correctness at scale
@pytest.mark.parametrize("name", ["ltr", "oracle-srtf", "fcfs"])
def test_decisions_at_scale_match_a_full_sort(name):
    """10k waiting requests: every decision keeps exactly the best num_slots candidates (brute-force check)."""
    rng = random.Random(7)
    slots = 32
    policy = make_policy(name, max_preemptions=None)
    sched = Scheduler(policy, slots)
    n = 10_000
    for i in range(n):
        length = rng.randint(1, 500)
        sched.add(Request(f"q{i}", rng.random() * 10, 10, max_tokens=length, score=rng.gauss(0, 1),
                          true_output_len=length), 10.0)
    now = 10.0
    for step in range(30):
        running, waiting = sched.running, list(sched.waiting)
        key = {r: (policy.priority(r), r.arrival_time, r._seq) for r in running + waiting}
        assert waiting == sorted(waiting, key=key.get)  # the waiting view is in priority order
        d = sched.schedule(now)
        if policy.preemptive:
            # the kept priorities are the best num_slots priorities (ties may keep either request)
            best = sorted(key[r][0] for r in running + waiting)[:slots]
            assert sorted(key[r][0] for r in sched.running) == best
        else:
            assert set(sched.running) == set(running) | set(waiting[: slots - len(running)])
        assert set(d.admit) == set(sched.running) - set(running)
        assert set(d.preempt) == set(running) - set(sched.running)
        assert len(sched.running) == slots and sched.num_waiting == n - slots - step * 3
        now += 0.01
        for r in sched.running:
            sched.on_token(r, now)
        for r in sched.running[:3]:
            sched.finish(r, now)


def test_decision_benchmark_runs_and_keeps_the_backlog(capsys):
    from ltr_jax.sim.decision_bench import main as bench_main

    assert bench_main(["--waiting", "300", "--slots", "8", "--decisions", "40", "--policy", "ltr,oracle-srtf"]) == 0
    report = json.loads(capsys.readouterr().out)
    for name in ("ltr", "oracle-srtf"):
        for mode in ("starvation_off", "starvation_threshold", "starvation_fcfs_slack"):
            result = report["policies"][name][mode]
            assert result["decisions"] == 40 and result["waiting_at_end"] == 300
            assert 0 < result["decision_cpu_us"]["p50"] <= result["decision_cpu_us"]["max"]
        assert report["policies"][name]["starvation_threshold"]["promotions"] > 0
