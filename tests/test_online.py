"""Online learning (`ltr_jax.engine.online`): the censored loss, the bounded buffer, accept / reject by held-back
concordance, versioned restart, and the atomic head swap at a batch boundary."""

from __future__ import annotations

import dataclasses
import logging
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import lowerings, wait_for
from flax import nnx

from ltr_jax.engine import online
from ltr_jax.engine.settings import OnlineLearningConfig
from ltr_jax.models.ranker import RankerHead, RankerSpec
from ltr_jax.models.ranker_checkpoint import save_ranker

SPEC = RankerSpec(model_name="toy", model_dim=4, n_layers=1, pooling="mean", hidden_dims=(8,), max_prompt_len=64)


def _descend(loss_fn, scores: np.ndarray, steps: int = 300, lr: float = 0.5) -> np.ndarray:
    s = jnp.asarray(scores, jnp.float32)
    grad = jax.grad(loss_fn)
    for _ in range(steps):
        s = s - lr * grad(s)
    return np.asarray(s)


def test_a_censored_request_never_counts_as_ending_where_it_was_cut():
    # A was cut at 20 tokens (its true length is at least 20), B ended at 10, C at 30
    lengths = jnp.asarray([20.0, 10.0, 30.0])
    censored_aware = jnp.asarray([False, True, True])
    naive = jnp.asarray([True, True, True])
    mask = np.asarray(online.censored_pair_mask(lengths, censored_aware))
    assert mask.tolist() == [[False, False, False], [True, False, True], [False, False, False]]  # B<A, B<C only
    valid = jnp.ones((3,), bool)
    start = np.array([0.0, 0.0, 0.5])  # A starts ranked below C
    aware = _descend(lambda s: online.pairwise_loss(s, lengths, censored_aware, valid), start)
    as_exact = _descend(lambda s: online.pairwise_loss(s, lengths, naive, valid), start)
    assert as_exact[0] > as_exact[2]  # treated as exact, the cut request is ranked shorter than C
    assert aware[0] < aware[2]  # censoring-aware: nothing says A is shorter than C, B's pair pushes A down
    assert aware[1] > aware[0] and aware[1] > aware[2]
    # the held-back judge ignores unknown pairs too: A above C costs nothing, B below A costs
    assert online.concordance_tau(np.array([2.0, 3.0, 1.0]), np.asarray(lengths), np.asarray(censored_aware)) == 1
    assert online.concordance_tau(np.array([3.0, 2.0, 1.0]), np.asarray(lengths), np.asarray(censored_aware)) == 0


def test_judging_held_back_examples_compiles_one_shape_per_power_of_two_of_them():
    """Each round holds back a different number of examples, and every compiled shape stays resident in the
    serving process: the candidate and live heads score padded rows, and the concordance mask is made on the
    host. 33 to 64 examples share one compiled shape; the scores are those of the head run eagerly."""
    head = RankerHead.for_spec(SPEC, seed=4)
    feats = np.random.default_rng(0).standard_normal((64, SPEC.feature_dim)).astype(np.float32)
    lengths, exact = np.arange(64, dtype=np.float32), np.arange(64) % 3 > 0
    online._head_scores(head, SPEC.method, feats[:40])  # compiles the 64-row shape
    with lowerings() as compiled:
        for n in (33, 50, 64):
            scores = online._head_scores(head, SPEC.method, feats[:n])
            assert scores.shape == (n,)
            online.concordance_tau(scores, lengths[:n], exact[:n])
    assert compiled == []
    eager = np.asarray(online.scores_from_outputs(SPEC.method, head(jnp.asarray(feats[:50]))))
    np.testing.assert_allclose(online._head_scores(head, SPEC.method, feats[:50]), eager, rtol=1e-5, atol=1e-6)


def test_the_buffer_keeps_at_most_its_capacity_newest_first():
    buf = online.ExampleBuffer(capacity=20, holdout_fraction=0.3)
    for i in range(100):
        buf.add(f"r{i}", online.Example(np.full((4,), i, np.float32), i + 1, False))
    train, held = buf.snapshot()
    assert len(buf) == 20 and len(train) + len(held) == 20 and buf.added == 100
    assert sorted(int(e.features[0]) for e in train + held) == list(range(80, 100))
    assert held and train  # both sides get examples
    assert all(online.is_held_back(f"r{int(e.features[0])}", 0.3) for e in held)
    assert buf.nbytes == 20 * 4 * 4


def _examples(n: int, sign: float, rng, held: bool | None = None):
    """(request id, example) pairs whose length rises with feature 0 (sign +1) or falls (-1); ``held`` picks
    ids on one side of the held-back split."""
    out = []
    i = 0
    while len(out) < n:
        rid = f"q{i}-{sign}"
        i += 1
        if held is not None and online.is_held_back(rid, 0.5) != held:
            continue
        x = rng.normal(size=4).astype(np.float32)
        out.append((rid, online.Example(x, int(200 + 60 * sign * x[0]), False)))
    return out


def _learner(tmp_path, head, **cfg):
    # rounds bounded by a step count, not seconds: the outcome does not depend on the machine's speed
    config = dataclasses.replace(OnlineLearningConfig(
        enabled=True, holdout_fraction=0.5, min_new=1, min_examples=8, steps_per_round=150, max_train_s=1e9,
        cpu_share=1.0, dir=str(tmp_path / "v")), **cfg)
    return online.OnlineLearner(config, SPEC, head)


def test_a_better_candidate_is_accepted_exported_and_handed_over_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    learner = _learner(tmp_path, RankerHead.for_spec(SPEC, seed=1))
    for rid, ex in _examples(80, +1, rng):
        learner.buffer.add(rid, ex)
    assert learner.run_round()
    assert learner.version == 1 and learner.metrics["accepted"] == 1
    assert learner.metrics["last_candidate_tau"] > learner.metrics["last_live_tau"] + 0.01
    assert (tmp_path / "v" / "v000001" / "ranker.json").is_file()
    version, head = learner.take_accepted()
    assert version == 1 and learner.take_accepted() is None
    from ltr_jax.models.ranker_checkpoint import load_ranker

    exported, _, meta = load_ranker(tmp_path / "v" / "v000001")
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)), jnp.float32)
    np.testing.assert_allclose(np.asarray(exported(x)), np.asarray(head(x)), rtol=1e-6)
    assert meta["online_version"] == 1 and meta["holdout_tau"] == learner.metrics["last_candidate_tau"]


def test_a_worse_candidate_is_rejected_and_the_live_head_stays(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    good = _learner(tmp_path / "good", RankerHead.for_spec(SPEC, seed=1))
    for rid, ex in _examples(80, +1, rng):  # a live head that orders this traffic well
        good.buffer.add(rid, ex)
    assert good.run_round()
    _, live = good.take_accepted()
    learner = _learner(tmp_path, live)
    for rid, ex in _examples(60, -1, rng, held=False) + _examples(30, +1, rng, held=True):
        learner.buffer.add(rid, ex)  # training data that teaches the reverse of what the held-back traffic shows
    assert not learner.run_round()
    assert learner.version == 0 and learner.metrics["rejected"] == 1 and learner.take_accepted() is None
    assert learner.metrics["last_candidate_tau"] < learner.metrics["last_live_tau"]
    assert not (tmp_path / "v").exists()


def test_a_head_fitted_to_other_traffic_is_replaced_by_a_fresh_lineage_it_cannot_adapt_to(tmp_path):
    from ltr_jax.models.ranker_checkpoint import load_ranker

    rng = np.random.default_rng(3)
    other = _learner(tmp_path / "other", RankerHead.for_spec(SPEC, seed=1), steps_per_round=400)
    for rid, ex in _examples(80, -1, rng):  # traffic where length falls with feature 0
        other.buffer.add(rid, ex)
    assert other.run_round()
    _, stale = other.take_accepted()
    served = _examples(80, +1, np.random.default_rng(4))  # this server's traffic: the reverse
    warm_only = _learner(tmp_path / "warm", stale, fresh_lineage=False)
    both = _learner(tmp_path / "both", stale)
    for learner in (warm_only, both):
        for rid, ex in served:
            learner.buffer.add(rid, ex)
        learner.run_round()
    assert warm_only.metrics["last_candidate_tau"] < 0  # one round cannot unlearn the other traffic's order
    assert both.version == 1 and both.metrics["last_candidate_tau"] > 0.3
    assert load_ranker(tmp_path / "both" / "v" / "v000001")[2]["lineage"] == "fresh"
    assert both._fresh is None  # the lineages met: training goes on from the live head alone
    assert set(warm_only.round_log[-1]["candidate_taus"]) == {"warm"}
    assert set(both.round_log[-1]["candidate_taus"]) == {"warm", "fresh"} and both.round_log[-1]["accepted"] == "fresh"
    fresh_start = _learner(tmp_path / "untrained", RankerHead.for_spec(SPEC, seed=1))
    assert fresh_start._fresh is None  # an untrained head is its own fresh lineage
    config = dataclasses.replace(both.config, dir=str(tmp_path / "both" / "v"))
    restarted = online.OnlineLearner(config, SPEC, both._live, version=1)
    assert restarted._fresh is None  # a head accepted on this traffic before a restart needs no second lineage


def test_restart_takes_the_newest_valid_version_and_skips_a_corrupt_one(tmp_path, caplog):
    root = tmp_path / "online"
    heads = {v: RankerHead.for_spec(SPEC, seed=v) for v in (1, 2, 3)}
    for v, head in heads.items():
        save_ranker(root / f"v{v:06d}", head, SPEC, extra={"online_version": v})
    (root / "v000003" / "ranker.json").write_text("{ torn")
    (root / "notes").mkdir()  # not a version directory: ignored
    with caplog.at_level(logging.WARNING, logger="ltr_jax.engine.online"):
        version, head, meta = online.newest_accepted_head(root, SPEC)
    assert version == 2 and meta["online_version"] == 2
    x = jnp.ones((1, 4))
    np.testing.assert_array_equal(np.asarray(head(x)), np.asarray(heads[2](x)))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "version 3" in warnings[0].getMessage()
    assert online.newest_accepted_head(tmp_path / "missing", SPEC) is None


def test_rounds_are_due_on_a_doubling_then_min_new_schedule_or_interval_within_the_time_share(tmp_path):
    now = {"t": 0.0}
    config = OnlineLearningConfig(enabled=True, min_new=10, interval_s=60, min_examples=4, max_train_share=0.05)
    learner = online.OnlineLearner(config, SPEC, RankerHead.for_spec(SPEC), clock=lambda: now["t"])
    rng = np.random.default_rng(2)
    examples = iter(_examples(200, +1, rng))

    def finish(n):
        for _ in range(n):
            rid, ex = next(examples)
            learner.observe(rid, ex.features, 0.0, ex.length, censored=False)

    def round_done(seconds):  # what run_round records, without training
        learner._added_at_last_round = learner.buffer.added
        learner._last_round = now["t"]
        learner.metrics["train_seconds"] += seconds

    finish(3)
    assert not learner.due()  # fewer than min_examples
    finish(1)
    assert learner.due()  # the young buffer's first round comes at min_examples
    round_done(0.0)
    finish(3)
    assert not learner.due()
    finish(1)
    assert learner.due()  # then after as many new as it held (4 more: 8)
    round_done(0.0)
    finish(7)
    assert not learner.due()  # min_new (10) caps the doubling: 8 would be due, 10 is the bar
    finish(3)
    assert learner.due()
    round_done(1.0)  # one second of compute at t=0: over its 5% share until t=20
    finish(10)
    assert not learner.due()
    now["t"] = 20.5
    assert learner.due()
    round_done(0.0)
    finish(1)
    assert not learner.due()  # 1 new < min_new and no interval passed
    now["t"] = 20.5 + 61.0
    assert learner.due()


# ------------------------------------------------------------------------------------------------ the swap
@pytest.fixture(scope="module")
def tiny_scorer():
    from ltr_jax.models.loading import load_model
    from ltr_jax.models.ranker import RankerScorer

    tiny = load_model("tiny")
    spec = RankerSpec(model_source="tiny", model_name=tiny.config.name, model_dim=tiny.config.dim, n_layers=2,
                      hidden_dims=(8,), max_prompt_len=64)
    return tiny, spec, lambda seed: RankerScorer(spec, RankerHead.for_spec(spec, seed=seed), tiny.config,
                                                 tiny.params)


def test_a_swap_is_atomic_no_batch_is_scored_by_a_mix_of_heads(tiny_scorer):
    tiny, spec, make = tiny_scorer
    scorer = make(1)
    heads = [RankerHead.for_spec(spec, seed=1), RankerHead.for_spec(spec, seed=2)]
    prompts = [tiny.tokenizer.encode(f"prompt {i} " + "w " * i) for i in range(6)]
    expected = []
    for h in heads:
        scorer.swap_head(h)
        expected.append(scorer.score(prompts))
    assert not np.allclose(expected[0], expected[1])
    stop = threading.Event()

    def swapper():
        i = 0
        while not stop.is_set():
            scorer.swap_head(heads[i % 2])
            i += 1

    thread = threading.Thread(target=swapper)
    thread.start()
    try:
        for _ in range(40):
            scores = scorer.score(prompts)
            assert any(np.array_equal(scores, e) for e in expected)
    finally:
        stop.set()
        thread.join()
    with pytest.raises(ValueError, match="do not match"):
        scorer.swap_head(RankerHead(spec.feature_dim, (4,), 1, nnx.Rngs(0)))


def test_the_ranking_stage_swaps_at_a_boundary_and_rescores_every_waiting_request(tiny_scorer):
    from ltr_jax.engine.engine import Engine
    from ltr_jax.engine.ranking import LearnedRanking
    from ltr_jax.engine.settings import EngineConfig
    from ltr_jax.models.llama import Llama
    from ltr_jax.scheduler.request import Request

    tiny, spec, make = tiny_scorer
    scorer = make(1)
    engine = Engine(Llama.from_params(tiny.config, tiny.params), EngineConfig(num_slots=2, max_seq_len=128))
    learner = online.OnlineLearner(OnlineLearningConfig(enabled=True), spec, scorer.head)
    stage = LearnedRanking(engine, scorer, reuse_pass=False, online=learner)
    requests = [Request(f"r{i}", float(i), 10, 16) for i in range(4)]
    prompts = [tiny.tokenizer.encode(f"question {i} " + "x " * i) for i in range(4)]
    stage.rank(requests, prompts)
    assert not stage.refresh()  # nothing accepted yet
    new_head = RankerHead.for_spec(spec, seed=7)
    learner._accepted = (1, new_head)  # what run_round hands over
    stage.finished(requests[0], 5, exact=True)  # r0 left: it is trained on, not rescored
    assert stage.refresh() and stage.counters["ranker_version"] == 1
    fresh = make(7).score(prompts)
    for req, want in zip(requests[1:], fresh[1:]):
        assert req.score == pytest.approx(float(want), rel=1e-5, abs=1e-6)
    assert len(learner.buffer) == 1 and stage.counters["online_buffer_examples"] == 1


def test_the_server_learns_from_what_it_serves_and_reports_it(tmp_path):
    """End to end over HTTP: finished requests fill the buffer (no prompt text), rounds run in the background,
    /metrics and /health show the version and the counters; the ranker's own export is never written."""
    import httpx

    from ltr_jax.config import ServeConfig, load_config
    from ltr_jax.models.loading import load_model
    from ltr_jax.server.inprocess import serve_in_thread

    tiny = load_model("tiny")
    spec = RankerSpec(model_source="tiny", model_name=tiny.config.name, model_dim=tiny.config.dim, n_layers=2,
                      hidden_dims=(8,), max_prompt_len=64)
    ranker_dir = save_ranker(tmp_path / "ranker", RankerHead.for_spec(spec, seed=3), spec)
    before = sorted(p.name for p in ranker_dir.rglob("*"))
    online_dir = tmp_path / "online"
    config = load_config(None, ["model.source=tiny", "model.name=tiny-random", "engine.num_slots=4",
                                "engine.max_seq_len=256", "engine.warmup_max_len=64", "server.default_max_tokens=32",
                                "logging.level=WARNING",
                                "ranker.enabled=true", f"ranker.checkpoint={ranker_dir}", "ranker.reuse_pass=false",
                                "ranker.online.enabled=true", "ranker.online.min_new=4",
                                "ranker.online.min_examples=4", "ranker.online.holdout_fraction=0.5",
                                "ranker.online.max_train_s=1", f"ranker.online.dir={online_dir}"], ServeConfig)
    with serve_in_thread(config) as srv:
        health = httpx.get(f"{srv.url}/health", timeout=10).json()
        assert health["ranker_version"] == 0
        for i in range(12):
            body = {"model": "tiny-random", "prompt": f"request {i} " + "w " * i, "max_tokens": 4 + 3 * i}
            assert httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60).status_code == 200

        def scraped():
            text = httpx.get(f"{srv.url}/metrics", timeout=10).text
            return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                    if line.startswith("ltr_jax_") and " " in line}

        learner = srv.runtime.online
        quiet = wait_for(lambda: learner.metrics["rounds"] >= 1 and not learner.training
                               and not learner.due(), timeout=120)
        assert quiet, "no online round ran within 120 s of 12 finished requests"
        # an accepted head is swapped in at the next boundary, idle or not
        assert wait_for(lambda: scraped()["ltr_jax_ranker_version"] == learner.version, timeout=30)
        m = scraped()
        assert m["ltr_jax_online_buffer_examples"] == 12 and m["ltr_jax_online_rounds_total"] >= 1
        assert m["ltr_jax_online_accepted_heads_total"] + m["ltr_jax_online_rejected_heads_total"] \
            == m["ltr_jax_online_rounds_total"]
        assert m["ltr_jax_ranker_version"] == m["ltr_jax_online_accepted_heads_total"]
        assert httpx.get(f"{srv.url}/health", timeout=10).json()["ranker_version"] == learner.version
        train, held = learner.buffer.snapshot()
        assert all(isinstance(e.features, np.ndarray) and e.features.shape == (spec.feature_dim,)
                   for e in train + held)  # features and lengths only
    assert sorted(p.name for p in ranker_dir.rglob("*")) == before
    accepted = online.version_dirs(online_dir)
    assert len(accepted) == int(m["ltr_jax_online_accepted_heads_total"])
