"""Ranker training: config validation, head training per method, metrics, and a tiny end-to-end run + export."""

import json

import numpy as np
import pytest

from ltr_jax.models.ranker import RankerSpec
from ltr_jax.models.ranker_checkpoint import load_scorer
from ltr_jax.models.tiny import tiny_model
from ltr_jax.train import __main__ as cli
from ltr_jax.train.features import cached_features, compute_features
from ltr_jax.train.metrics import pair_accuracy, per_group_tau, ranking_metrics
from ltr_jax.train.trainer import (
    PROJECT_ROOT,
    ConfigError,
    TrainConfig,
    head_scores,
    run_training,
    train_head,
)


# ------------------------------------------------------------------------------------------------ config
def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'learning_rate'"):
        TrainConfig.from_dict({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer\.momentum'"):
        TrainConfig.from_dict({"optimizer": {"name": "adamw", "momentum": 0.9}})
    path = tmp_path / "configs" / "bad.yaml"
    path.parent.mkdir()
    path.write_text("methods: [listmle, pairwise]\nexport_method: null\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*unknown method 'pairwise'"):
        TrainConfig.from_yaml(path)


def test_yaml_config_resolves_paths_against_the_project_root(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text(f"labels: data/labels.jsonl\nexport_path: {tmp_path}/ranker\nlist_size: 16\n"
                    "prompts: shared\noptimizer: {lr: 0.01, weight_decay: 0.0}\n")
    cfg = TrainConfig.from_yaml(path)
    assert cfg.labels == str(PROJECT_ROOT / "data" / "labels.jsonl")
    assert cfg.export_path == str(tmp_path / "ranker")
    assert cfg.prompts == "shared"
    assert cfg.list_size == 16 and cfg.optimizer.lr == 0.01 and cfg.optimizer.name == "adamw"
    with pytest.raises(ConfigError, match="export_path: required"):
        TrainConfig(export_path=None)


def test_cv_folds_must_be_off_or_at_least_two():
    with pytest.raises(ConfigError, match=r"cv_folds = 1 is not allowed: must be 0 \(off\)"):
        TrainConfig(cv_folds=1, export_method=None)
    assert TrainConfig(cv_folds=5, export_method=None).cv_folds == 5


def test_cli_reports_config_errors(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("epochz: 3\n")
    assert cli.main(["--config", str(path)]) == 2
    assert "unknown key 'epochz' (did you mean 'epochs'?)" in capsys.readouterr().err
    path.write_text("epochs: 3\nexport_method: null\n")
    assert cli.main(["--config", str(path), "--set", "epochs=0"]) == 2
    assert "--set epochs=0: epochs = 0 is not allowed: must be >= 1" in capsys.readouterr().err
    assert TrainConfig.from_yaml(path, ["optimizer.lr=0.5", "methods=[listmle]"]).optimizer.lr == 0.5


# ------------------------------------------------------------------------------------------------ metrics
def test_ranking_metrics_perfect_reversed_and_brute_force_pairs():
    lengths = np.array([5, 50, 500, 20, 7])
    perfect = -np.log(lengths)
    assert ranking_metrics(perfect, lengths)["kendall_tau_b"] == pytest.approx(1.0)
    assert ranking_metrics(-perfect, lengths)["kendall_tau_b"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=30).astype(float)  # many score ties
    lens = rng.integers(0, 6, size=30)  # many length ties
    right = total = 0.0
    for i in range(30):
        for j in range(i + 1, 30):
            if lens[i] == lens[j]:
                continue
            total += 1
            shorter, longer = (i, j) if lens[i] < lens[j] else (j, i)
            right += 1.0 if scores[shorter] > scores[longer] else 0.5 if scores[shorter] == scores[longer] else 0.0
    assert pair_accuracy(scores, lens) == pytest.approx(right / total)
    groups = ["a"] * 15 + ["b"] * 15
    per = per_group_tau(scores, lens, groups)
    assert set(per) == {"a", "b"}


# ------------------------------------------------------------------------------------------------ head training
def synthetic(n, seed):
    """Features whose first two dimensions determine a log length (plus noise)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 12)).astype(np.float32)
    log_len = 3.0 + 1.2 * x[:, 0] - 0.8 * x[:, 1] + 0.3 * rng.normal(size=n)
    return x, np.maximum(1, np.round(np.exp(log_len))).astype(np.int64)


@pytest.mark.parametrize("method", ["listmle", "regression", "classify"])
def test_each_method_learns_the_length_order(method):
    x, lengths = synthetic(640, 0)
    xv, lv = synthetic(300, 1)
    cfg = TrainConfig(epochs=40, hidden_dims=[16], export_method=None, optimizer={"lr": 1e-2})
    spec = RankerSpec(model_dim=12, n_layers=1, hidden_dims=(16,))
    result = train_head(method, x, lengths, spec, cfg)
    tau = ranking_metrics(head_scores(result.head, method, xv), lv)["kendall_tau_b"]
    assert tau > 0.6, f"{method} tau {tau}"
    assert result.spec.method == method
    if method == "classify":
        assert result.spec.num_outputs == 10 and len(result.spec.bucket_edges) == 9


def test_training_is_reproducible_for_a_seed():
    x, lengths = synthetic(200, 2)
    cfg = TrainConfig(epochs=2, hidden_dims=[8], export_method=None)
    spec = RankerSpec(model_dim=12, n_layers=1, hidden_dims=(8,))
    a = head_scores(train_head("listmle", x, lengths, spec, cfg).head, "listmle", x)
    b = head_scores(train_head("listmle", x, lengths, spec, cfg).head, "listmle", x)
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------ features
def test_feature_cache_reuses_rows_and_extends(tmp_path):
    model = tiny_model(seed=2)
    prompts = [[1, 2, 3], list(range(20)), [9] * 40, [4, 4]]
    first = cached_features(model.config, model.params, prompts[:3], 1, tmp_path, progress=False)
    assert first.computed == 3
    again = cached_features(model.config, model.params, prompts, 1, tmp_path, progress=False)
    assert again.computed == 1  # only the new prompt
    np.testing.assert_array_equal(again.mean[:3], first.mean)
    direct_mean, direct_last = compute_features(model.config, model.params, prompts, 1, progress=False)
    np.testing.assert_allclose(again.mean, direct_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(again.select("mean+last")[:, model.config.dim:], direct_last, rtol=1e-5, atol=1e-6)
    (next(tmp_path.glob("*.npz"))).write_bytes(b"broken")
    rebuilt = cached_features(model.config, model.params, prompts, 1, tmp_path, progress=False)
    assert rebuilt.computed == 4


# ------------------------------------------------------------------------------------------------ end to end
def test_end_to_end_run_exports_a_servable_ranker(tmp_path):
    model = tiny_model(seed=4)
    rng = np.random.default_rng(0)
    words = ["short", "brief", "essay", "story", "list", "explain", "sum", "poem"]
    prompts, labels = [], []
    for i in range(240):
        # The prompt wording decides the (noisy) output length: a learnable signal for the tiny backbone.
        w = words[i % len(words)]
        prompts.append({"id": f"q{i}", "prompt": f"{w} {w} please {i}", "reference": "x"})
        base = {"short": 5, "brief": 10, "sum": 20, "list": 60, "explain": 120, "poem": 200, "story": 400,
                "essay": 800}[w]
        labels.append({"id": f"q{i}", "prompt_tokens": 10, "output_tokens": int(base * rng.uniform(0.8, 1.25)),
                       "finish_reason": "stop"})
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in labels))
    cfg = TrainConfig(prompts=str(tmp_path / "prompts.jsonl"), labels=str(tmp_path / "labels.jsonl"), n_layers=1,
                      pooling="mean+last", hidden_dims=[16], max_prompt_len=64, epochs=20, val_fraction=0.25,
                      feature_cache_dir=None, export_path=str(tmp_path / "ranker"), cv_folds=3,
                      optimizer={"lr": 3e-3})
    report = run_training(cfg, model=model, progress=False)
    assert set(report["methods"]) == {"listmle", "regression", "classify"}
    assert report["n_train"] + report["n_val"] == 240
    for method, m in report["methods"].items():
        assert m["tau_b"] > 0.5 and m["ci95"][0] <= m["tau_b"] <= m["ci95"][1] and m["n"] == report["n_val"]
        assert set(m["baselines"]) == {"source_prior", "prompt_length"}, (method, m)
        cv = m["cross_validation"]  # every fold scored by a head that never saw it
        assert cv["folds"] == 3 and len(cv["per_fold"]) == 3 and cv["kendall_tau_b_mean"] > 0.5, (method, cv)
    assert report["exported"] == str(tmp_path / "ranker")
    json.dumps(report)  # JSON-able
    scorer = load_scorer(tmp_path / "ranker", model=model)
    tokens = [model.tokenizer.encode(model.tokenizer.apply_chat_template([{"role": "user", "content": p}]))
              for p in ("short short please 1", "essay essay please 2")]
    short, long = scorer.score(tokens)
    assert short > long


def test_training_can_start_from_a_given_head():
    x, lengths = synthetic(200, 3)
    spec = RankerSpec(model_dim=12, n_layers=1, hidden_dims=(8,))
    cfg = TrainConfig(epochs=3, hidden_dims=[8], export_method=None, optimizer={"lr": 1e-2})
    first = train_head("listmle", x, lengths, spec, cfg).head
    frozen = TrainConfig(epochs=1, hidden_dims=[8], export_method=None, optimizer={"lr": 0.0, "weight_decay": 0.0})
    again = train_head("listmle", x, lengths, spec, frozen, init_head=first).head
    np.testing.assert_array_equal(head_scores(again, "listmle", x), head_scores(first, "listmle", x))
    fresh = train_head("listmle", x, lengths, spec, frozen).head
    assert not np.array_equal(head_scores(fresh, "listmle", x), head_scores(first, "listmle", x))
