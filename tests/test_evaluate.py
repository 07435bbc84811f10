"""`ltr_jax.train.metrics` on constructed orders; `python -m ltr_jax.train.evaluate` end to end on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ltr_jax.train import evaluate, metrics

ONE = pytest.approx(1.0, abs=1e-12)  # scipy gives a perfect order a tau-b of 1 up to the last bit
MINUS_ONE = pytest.approx(-1.0, abs=1e-12)


def test_known_orders_give_tau_one_minus_one_and_count_ties():
    lengths = np.array([5, 10, 20, 40, 80, 160])
    sources, plens = ["a"] * 3 + ["b"] * 3, [1] * 6
    best = metrics.evaluation(-lengths.astype(float), lengths, sources, plens, np.zeros(6), n_resamples=50)
    assert best["tau_b"] == ONE and best["pair_accuracy"] == 1.0 and best["per_source"] == {"a": ONE, "b": ONE}
    assert best["ci95"] == [ONE, ONE] and best["n"] == 6
    worst = metrics.evaluation(lengths.astype(float), lengths, sources, plens, np.zeros(6), n_resamples=50)
    assert worst["tau_b"] == MINUS_ONE and worst["pair_accuracy"] == 0.0
    # ties: two equal lengths and a scorer that ties two items; tau-b by hand: concordant 13, discordant 0, and
    # (n0 - n1)(n0 - n2) = (15 - 1)(15 - 1)
    tied_lengths = np.array([1, 2, 2, 3, 4, 5])
    tied_scores = -np.array([1, 2, 3, 4, 4, 5], float)
    tied = metrics.evaluation(tied_scores, tied_lengths, ["a"] * 6, plens, np.zeros(6), n_resamples=50)
    assert tied["tau_b"] == pytest.approx(13 / 14)
    assert tied["pair_accuracy"] == pytest.approx((13 + 0.5) / 14)  # a scorer tie on a length difference: 1/2


def test_baselines_source_prior_and_prompt_length():
    lengths = np.array([10, 12, 14, 100, 120, 140])
    sources = ["math"] * 3 + ["essay"] * 3
    prior = metrics.source_prior(["math", "essay", "essay"], np.array([8, 90, 150]), sources)
    assert prior[0] == prior[2] > prior[3] == prior[5]  # math is shorter in the fitting data: it ranks first
    result = metrics.evaluation(np.zeros(6) + np.arange(6), lengths, sources, [3, 2, 1, 6, 5, 4], prior,
                                 n_resamples=50)
    assert result["baselines"]["source_prior"] == pytest.approx(9 / np.sqrt(15 * 9))  # ties within each source
    assert result["baselines"]["prompt_length"] == pytest.approx((9 - 6) / 15)  # across: 9 agree, within: 6 not
    # cross-fitting: no prompt's own length enters its prior (a single prompt of its source gets the overall mean)
    ids = [f"p{i}" for i in range(40)]
    srcs = ["a"] * 20 + ["b"] * 19 + ["lonely"]
    cf = metrics.cross_fitted_source_prior(ids, srcs, np.array([5] * 20 + [500] * 19 + [1]))
    assert cf[:20].min() > cf[39] > cf[20:39].max()  # the lonely prompt sits between: the overall mean


def test_the_interval_narrows_with_more_prompts():
    rng = np.random.default_rng(0)

    def width(n):
        lengths = rng.lognormal(5, 1, n)
        scores = -np.log(lengths) + rng.normal(0, 1, n)
        lo, hi = metrics.bootstrap_ci(scores, lengths, n_resamples=300)
        tau = metrics.tau_b(scores, lengths)
        assert lo <= tau <= hi
        return hi - lo

    small, big = width(50), width(800)
    assert big < small / 2  # about 1/sqrt(n): 4x narrower for 16x the prompts


@pytest.fixture(scope="module")
def tiny_ranker(tmp_path_factory):
    from ltr_jax.models.loading import load_model
    from ltr_jax.models.ranker import RankerHead, RankerSpec
    from ltr_jax.models.ranker_checkpoint import load_scorer, save_ranker
    from ltr_jax.train.data import render_prompt

    tmp = tmp_path_factory.mktemp("evaluate")
    tiny = load_model("tiny")
    spec = RankerSpec(model_source="tiny", model_name=tiny.config.name, model_dim=tiny.config.dim, n_layers=2,
                      hidden_dims=(8,), max_prompt_len=64)
    path = save_ranker(tmp / "ranker", RankerHead.for_spec(spec, seed=3), spec)
    prompts = [f"prompt number {i} " + "w " * (i % 7) for i in range(24)]
    scores = load_scorer(path, tiny).score([render_prompt(tiny.tokenizer, p, 64) for p in prompts])
    return path, prompts, scores


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _run(capsys, argv):
    code = evaluate.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_scores_a_ranker_on_a_named_answer(tiny_ranker, tmp_path, capsys):
    """Answers as long as the ranker's own order says: tau-b must be exactly 1 (and -1 when reversed)."""
    path, prompts, scores = tiny_ranker
    rank = np.argsort(np.argsort(-scores))  # 0 = highest score = predicted shortest
    rows = [{"id": f"q{i}", "source": "alpacaeval/" + "ab"[i % 2], "prompt": p,
             "outputs": {"m": "y" * (5 + 3 * int(rank[i])), "rev": "y" * (200 - 3 * int(rank[i]))}}
            for i, p in enumerate(prompts)]
    prompts_file = _write(tmp_path / "p.jsonl", rows)
    code, out, _ = _run(capsys, ["--ranker", str(path), "--prompts", str(prompts_file), "--lengths", "outputs.m",
                                 "--json", "--bootstrap", "50"])
    assert code == 0
    result = json.loads(out.strip().splitlines()[-1])
    assert result["tau_b"] == ONE and result["pair_accuracy"] == 1.0 and result["n"] == 24
    assert result["per_source"] == {"alpacaeval/a": ONE, "alpacaeval/b": ONE}
    assert set(result["baselines"]) == {"source_prior", "prompt_length"} and result["ci95"] == [ONE, ONE]
    assert "cross-fitted" in result["source_prior_fit"]  # this export records no training data
    assert "Kendall tau-b" in out and "tau-b within alpacaeval/a (12)" in out
    code, out, _ = _run(capsys, ["--ranker", str(path), "--prompts", str(prompts_file), "--lengths", "outputs.rev",
                                 "--json", "--bootstrap", "50"])
    assert code == 0 and json.loads(out.strip().splitlines()[-1])["tau_b"] == MINUS_ONE


def test_bad_files_and_keys_are_clear_errors(tiny_ranker, tmp_path, capsys):
    path, prompts, _ = tiny_ranker
    good = [{"id": f"q{i}", "prompt": p, "reference": "z" * i, "outputs": {"m": "y" * i}}
            for i, p in enumerate(prompts, start=1)]
    cases = {
        "unknown key": (good, ["--lengths", "outputs.llama3-8b"],
                        "no record has 'outputs.llama3-8b'; its records' outputs are outputs.m"),
        "missing answer": ([*good, {"id": "late", "prompt": "p"}], ["--lengths", "outputs.m"],
                           "1 of 25 records have no 'outputs.m' (first: 'late')"),
        "missing prompt": ([*good, {"id": "bad", "text": "p"}], [], "unrecognised record"),
        "empty": ([], [], "no prompts in it"),
        "not a field": (good, ["--lengths", "llama3-8b"], "not an answer field nor a label file"),
    }
    for name, (rows, extra, message) in cases.items():
        prompts_file = _write(tmp_path / f"{name}.jsonl", rows)
        code, _, err = _run(capsys, ["--ranker", str(path), "--prompts", str(prompts_file), *extra])
        assert code == 2 and message in err, (name, err)
        assert name == "not a field" or prompts_file.name in err, (name, err)  # the file that is wrong is named
    code, _, err = _run(capsys, ["--ranker", str(tmp_path / "nowhere"), "--prompts", str(prompts_file)])
    assert code == 2 and "nowhere" in err


def test_simulate_replays_a_rankers_real_scores_on_the_prompts_it_held_out(tiny_ranker, tmp_path):
    """`bench simulate --ranker`: the trace draws only the ranker's held-out prompts (its recorded split), each
    with its own score, and reports that tau; answers in the ranker's own order give tau exactly 1."""
    from ltr_jax.bench import simulate
    from ltr_jax.models.loading import load_model
    from ltr_jax.models.ranker_checkpoint import load_scorer, read_spec, save_ranker
    from ltr_jax.train.data import is_validation, render_prompt

    path, _, _ = tiny_ranker
    spec, _ = read_spec(path)
    head_dir = save_ranker(tmp_path / "split_ranker", load_scorer(path).head, spec,
                           extra={"train_config": {"val_fraction": 0.5, "split_salt": "s"}})
    tiny = load_model("tiny")
    prompts = [f"question {i} " + "w " * (i % 9) for i in range(40)]
    scores = load_scorer(head_dir, tiny).score([render_prompt(tiny.tokenizer, p, 64) for p in prompts])
    rank = np.argsort(np.argsort(-scores))
    rows = [{"id": f"q{i}", "prompt": p, "outputs": {"m": "y" * (4 + 2 * int(rank[i]))}}
            for i, p in enumerate(prompts)]
    prompts_file = _write(tmp_path / "p.jsonl", rows)
    held = sum(is_validation(f"q{i}", 0.5, "s") for i in range(40))
    report = simulate.main(["--ranker", str(head_dir), "--prompts", str(prompts_file), "--lengths", "outputs.m",
                            "--n", "200", "--rates", "50", "--slots", "2", "--policies", "fcfs,ltr,oracle-sjf",
                            "--jobs", "1", "--ranker-cost", "0"])
    assert report["ranker_tau"] == ONE and f"on the {held} held-out prompts" in report["ranker_tau_source"]
    assert report["trace_info"]["rate=50"]["achieved_kendall_tau"] == ONE
    # ranking by true order is oracle-sjf's order: the two policies serve the trace identically
    run = report["runs"]["rate=50"]
    assert run["ltr"]["latency_s"]["mean"] == pytest.approx(run["oracle-sjf"]["latency_s"]["mean"], rel=1e-9)
    assert run["fcfs"]["latency_s"]["mean"] > run["ltr"]["latency_s"]["mean"]
    with pytest.raises(SystemExit):
        simulate.main(["--ranker", str(head_dir), "--prompts", str(prompts_file)])  # no --lengths


def test_held_out_scores_only_the_split_the_ranker_never_trained_on(tiny_ranker, tmp_path, capsys):
    from ltr_jax.models.ranker_checkpoint import load_scorer, read_spec, save_ranker
    from ltr_jax.train.data import is_validation

    path, prompts, _ = tiny_ranker
    spec, _ = read_spec(path)
    split_ranker = save_ranker(tmp_path / "split_ranker", load_scorer(path).head, spec,
                               extra={"train_config": {"val_fraction": 0.5, "split_salt": "s"}})
    rows = [{"id": f"q{i}", "prompt": p, "outputs": {"m": "y" * (3 + i)}} for i, p in enumerate(prompts)]
    prompts_file = _write(tmp_path / "p.jsonl", rows)
    code, out, _ = _run(capsys, ["--ranker", str(split_ranker), "--prompts", str(prompts_file), "--lengths",
                                 "outputs.m", "--held-out", "--json", "--bootstrap", "20"])
    assert code == 0
    assert json.loads(out.strip().splitlines()[-1])["n"] == sum(is_validation(r["id"], 0.5, "s") for r in rows)
    code, _, err = _run(capsys, ["--ranker", str(path), "--prompts", str(prompts_file), "--lengths", "outputs.m",
                                 "--held-out"])
    assert code == 2 and "does not record its training split" in err


def test_the_rise_of_tau_between_two_samples_carries_a_ci_that_tells_noise_from_a_rise():
    from ltr_jax.train.metrics import tau_difference_ci

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 500, size=80).astype(float)
    noisy = -lengths + rng.normal(scale=400, size=80)  # weakly ordered
    sharp = -lengths + rng.normal(scale=20, size=80)  # nearly ordered
    diff, lo, hi = tau_difference_ci((noisy, lengths), (sharp, lengths), n_resamples=300)
    assert 0 < lo < diff < hi  # a rise beyond the noise
    same, lo, hi = tau_difference_ci((noisy, lengths), (noisy, lengths), n_resamples=300)
    assert same == 0 and lo < 0 < hi  # the same ranking twice: no rise, and the CI says so


def test_a_paired_rise_on_the_same_rows_is_told_from_noise_where_two_independent_samples_cannot():
    from ltr_jax.train.metrics import paired_tau_difference_ci, tau_difference_ci

    rng = np.random.default_rng(1)
    lengths = rng.integers(1, 500, size=100).astype(float)
    errors = rng.normal(scale=300, size=100)
    before = -lengths + errors
    after = -lengths + 0.7 * errors  # the same mistakes, smaller: a modest, real improvement on every row
    diff, lo, hi = paired_tau_difference_ci(before, after, lengths, n_resamples=300)
    assert 0 < lo < diff < hi
    unpaired, ulo, uhi = tau_difference_ci((before, lengths), (after, lengths), n_resamples=300)
    assert abs(unpaired - diff) < 1e-12 and ulo < 0 < uhi  # resampled apart, the rows' spread hides the rise
    same, lo, hi = paired_tau_difference_ci(before, before, lengths, n_resamples=300)
    assert same == 0 and lo == 0 == hi  # the same scores twice: every resample's difference is 0
