"""Ranker export/restore with Orbax: bit-identical scores after a round trip, clear errors for bad exports."""

import gc
import json
import re
import shutil

import numpy as np
import pytest

from ltr_jax.models.ranker import RankerHead, RankerScorer, RankerSpec
from ltr_jax.models.ranker_checkpoint import RankerCheckpointError, load_ranker, load_scorer, save_ranker
from ltr_jax.models.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


@pytest.fixture(scope="module")
def spec(model):
    return RankerSpec(method="classify", model_name=model.config.name, model_dim=model.config.dim, n_layers=2,
                      pooling="mean+last", hidden_dims=(12,), num_outputs=4, bucket_edges=(5.0, 50.0, 500.0),
                      max_prompt_len=64)


@pytest.fixture
def exported(tmp_path, model, spec):
    head = RankerHead.for_spec(spec, seed=7)
    rng = np.random.default_rng(0)
    head.set_feature_stats(rng.normal(size=(20, spec.feature_dim)).astype(np.float32))
    path = save_ranker(tmp_path / "ranker", head, spec, extra={"note": "test"})
    return path, head


PROMPTS = [[1, 2, 3, 4, 5], list(range(10, 40)), [7] * 12, list(range(60))]


def test_export_then_restore_gives_bit_identical_scores(exported, model, spec):
    path, head = exported
    before = RankerScorer(spec, head, model.config, model.params).raw(PROMPTS)
    _restored_head, restored_spec, meta = load_ranker(path)
    assert restored_spec == spec
    assert meta["note"] == "test" and meta["spec"]["pooling"] == "mean+last"
    after = load_scorer(path, model=model).raw(PROMPTS)
    np.testing.assert_array_equal(before[0], after[0])
    np.testing.assert_array_equal(before[1], after[1])
    # The export is small: the head only.
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert size < 200_000


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(RankerCheckpointError, match=r"nowhere.*directory missing"):
        load_ranker(tmp_path / "nowhere")


def test_missing_spec_or_head(exported):
    path, _ = exported
    shutil.rmtree(path / "head")
    with pytest.raises(RankerCheckpointError, match=r"head: missing"):
        load_ranker(path)
    (path / "ranker.json").unlink()
    with pytest.raises(RankerCheckpointError, match=r"ranker.json: missing"):
        load_ranker(path)


def test_corrupt_json(exported):
    path, _ = exported
    (path / "ranker.json").write_text("{not json")
    with pytest.raises(RankerCheckpointError, match=r"ranker.json: not valid JSON"):
        load_ranker(path)


def test_spec_that_disagrees_with_the_arrays(exported):
    path, _ = exported
    meta = json.loads((path / "ranker.json").read_text())
    meta["spec"]["model_dim"] = 576  # the arrays were written for the tiny model's width
    (path / "ranker.json").write_text(json.dumps(meta))
    with pytest.raises(RankerCheckpointError, match=r"do not match ranker.json.*model_dim 576.*layers.0.kernel"):
        load_ranker(path)


def test_corrupt_array_data_is_refused_by_its_digest_before_orbax_reads_it(exported):
    path, _ = exported
    data_files = sorted(f for f in (path / "head").rglob("*") if f.is_file() and f.parent.name == "d")
    assert data_files
    for f in data_files:
        f.write_bytes(b"\0garbage" * 8)
    with pytest.raises(RankerCheckpointError, match=re.escape(str(data_files[0])) + r": corrupt \(its SHA-256"):
        load_ranker(path)
    data_files[0].unlink()
    with pytest.raises(RankerCheckpointError, match=re.escape(str(data_files[0])) + r": missing"):
        load_ranker(path)


# Orbax's failed read leaves a callback for its closed event loop, which Python reports as an unraisable exception
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_export_without_digests_is_read_and_orbax_errors_are_named(exported):
    path, _ = exported
    meta = json.loads((path / "ranker.json").read_text())
    del meta["head_sha256"]  # as exported before the digests
    (path / "ranker.json").write_text(json.dumps(meta))
    load_ranker(path)
    (path / "head" / "manifest.ocdbt").write_bytes(b"\0garbage" * 8)
    with pytest.raises(RankerCheckpointError, match=re.escape(str(path / "head")) + ": unreadable Orbax checkpoint"):
        load_ranker(path)
    gc.collect()  # the failed read's leftovers go now, inside this test (see the mark above)


def test_backbone_mismatch_is_refused(exported, spec):
    path, _ = exported
    other = tiny_model(seed=1, dim=32, n_heads=4, n_kv_heads=2)
    with pytest.raises(RankerCheckpointError, match=r"trained on .*dim 64.*dim 32"):
        load_scorer(path, model=other)


def test_save_refuses_a_head_that_does_not_fit_the_spec(tmp_path, spec):
    wrong = RankerHead(spec.feature_dim, [3], spec.num_outputs, __import__("flax").nnx.Rngs(0))
    with pytest.raises(ValueError, match="do not match the spec"):
        save_ranker(tmp_path / "x", wrong, spec)
