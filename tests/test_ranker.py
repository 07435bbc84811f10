"""The ranker model: spec validation, pooling, head, and batched serving-time scoring on a tiny random model."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ltr_jax.models.llama import hidden_states
from ltr_jax.models.padding import length_bucket, length_ladder
from ltr_jax.models.ranker import (
    RankerHead,
    RankerScorer,
    RankerSpec,
    backbone_params,
    pool,
    truncate_prompt_tokens,
)
from ltr_jax.models.tiny import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, n_layers=3)


def make_spec(model, **kw):
    base = {"model_name": model.config.name, "model_dim": model.config.dim, "n_layers": 2, "pooling": "mean",
                "hidden_dims": (16,), "max_prompt_len": 64}
    base.update(kw)
    return RankerSpec(**base)


def random_prompts(n, seed=0, lo=3, hi=30):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def test_spec_rejects_bad_values_with_named_fields():
    with pytest.raises(ValueError, match="pooling='max'"):
        RankerSpec(model_dim=8, pooling="max")
    with pytest.raises(ValueError, match="method='pairwise'"):
        RankerSpec(model_dim=8, method="pairwise")
    with pytest.raises(ValueError, match="needs 9 bucket_edges"):
        RankerSpec(model_dim=8, method="classify", num_outputs=10, bucket_edges=(1.0, 2.0))
    with pytest.raises(ValueError, match="model_dim"):
        RankerSpec(model_dim=0)
    with pytest.raises(ValueError, match="unknown RankerSpec keys"):
        RankerSpec.from_dict({"model_dim": 8, "colour": "red"})
    spec = RankerSpec(model_dim=8, pooling="mean+last", hidden_dims=[4])
    assert spec.feature_dim == 16
    assert RankerSpec.from_dict(spec.to_dict()) == spec


def test_truncation_keeps_head_and_tail():
    tokens = list(range(100))
    assert truncate_prompt_tokens(tokens, 200) == tokens
    cut = truncate_prompt_tokens(tokens, 40)
    assert len(cut) == 40
    assert cut[:30] == list(range(30)) and cut[30:] == list(range(90, 100))
    with pytest.raises(ValueError, match="positive"):
        truncate_prompt_tokens(tokens, 0)


def test_pooling_matches_manual_mean_and_last(model):
    cfg, params = backbone_params(model.config, model.params, 2)
    tokens = np.array([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]], np.int32)
    lengths = np.array([4, 6], np.int32)
    hidden = np.asarray(hidden_states(cfg, params, tokens, lengths, 2))
    mean = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(lengths), "mean"))
    last = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(lengths), "last"))
    np.testing.assert_allclose(mean[0], hidden[0, :4].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(mean[1], hidden[1].mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(last[0], hidden[0, 3])
    both = np.asarray(pool(jnp.asarray(hidden), jnp.asarray(lengths), "mean+last"))
    np.testing.assert_allclose(both, np.concatenate([mean, last], 1), rtol=1e-5, atol=1e-6)


def test_backbone_depth_is_checked(model):
    with pytest.raises(ValueError, match="n_layers=4 must be in 1..3"):
        backbone_params(model.config, model.params, 4)


def test_head_standardises_features_and_emits_outputs():
    head = RankerHead(6, [8], 3, nnx.Rngs(0))
    feats = np.random.default_rng(0).normal(5.0, 3.0, size=(50, 6)).astype(np.float32)
    head.set_feature_stats(feats)
    np.testing.assert_allclose(np.asarray(head.feature_mean[...]), feats.mean(0), rtol=1e-5)
    out = head(jnp.asarray(feats))
    assert out.shape == (50, 3)
    # Shifting every input by the training mean's offset is absorbed by the standardisation.
    shifted = RankerHead(6, [8], 3, nnx.Rngs(0))
    shifted.set_feature_stats(feats + 100.0)
    np.testing.assert_allclose(np.asarray(shifted(jnp.asarray(feats + 100.0))), np.asarray(out), atol=1e-3)


@pytest.mark.parametrize("pooling", ["mean", "last", "mean+last"])
def test_scorer_batched_scores_match_one_at_a_time(model, pooling):
    spec = make_spec(model, pooling=pooling)
    head = RankerHead.for_spec(spec, seed=1)
    scorer = RankerScorer(spec, head, model.config, model.params, max_batch=4)
    prompts = random_prompts(7)
    together = scorer.score(prompts)
    alone = np.array([scorer.score([p])[0] for p in prompts])
    assert together.shape == (7,) and together.dtype == np.float32
    np.testing.assert_allclose(together, alone, rtol=1e-4, atol=1e-5)
    # Order of the request list does not change any prompt's score.
    perm = np.random.default_rng(1).permutation(7)
    np.testing.assert_allclose(scorer.score([prompts[i] for i in perm]), together[perm], rtol=1e-4, atol=1e-5)
    assert len(set(np.round(together, 5).tolist())) > 1  # different prompts, different scores


def test_scorer_truncates_long_prompts_and_rejects_empty(model):
    spec = make_spec(model, max_prompt_len=32)
    scorer = RankerScorer(spec, RankerHead.for_spec(spec), model.config, model.params)
    long_prompt = list(range(100))
    np.testing.assert_allclose(scorer.score([long_prompt]), scorer.score([truncate_prompt_tokens(long_prompt, 32)]))
    with pytest.raises(ValueError, match="empty prompt"):
        scorer.score([[1, 2], []])


def test_classifier_score_is_minus_expected_bucket(model):
    spec = make_spec(model, method="classify", num_outputs=4, bucket_edges=(10, 20, 30))
    scorer = RankerScorer(spec, RankerHead.for_spec(spec), model.config, model.params)
    prompts = random_prompts(5)
    scores, outputs = scorer.raw(prompts)
    probs = np.exp(outputs - outputs.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    np.testing.assert_allclose(scores, -(probs * np.arange(4)).sum(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(scorer.predict_buckets(prompts), outputs.argmax(1))
    listmle = RankerScorer(make_spec(model), RankerHead.for_spec(make_spec(model)), model.config, model.params)
    with pytest.raises(ValueError, match="needs a 'classify' ranker"):
        listmle.predict_buckets(prompts)


def test_scorer_refuses_a_backbone_of_another_width(model):
    spec = make_spec(model, model_dim=model.config.dim * 2)
    with pytest.raises(ValueError, match="dim"):
        RankerScorer(spec, RankerHead.for_spec(spec), model.config, model.params)


def test_length_buckets_double_and_cap():
    assert length_ladder(512) == [16, 32, 64, 128, 256, 512]
    assert [length_bucket(n, 512) for n in (1, 16, 17, 25, 84, 100, 300, 600)] == [16, 16, 32, 32, 128, 128, 512, 512]
    assert length_ladder(512, min_bucket=20)[:3] == [20, 32, 64]  # the smallest bucket is min_bucket itself
    assert length_ladder(8, min_bucket=1) == [1, 2, 4, 8]
    assert length_bucket(60, 100) == 64 and length_bucket(65, 100) == 100
    assert length_ladder(100) == [16, 32, 64, 100]
    for n in range(1, 513):  # every prompt fits its bucket, and padding stays under half the bucket
        b = length_bucket(n, 512)
        assert n <= b and (b <= 16 or b - n < b / 2)


def test_warmup_covers_every_bucket(model):
    spec = make_spec(model, max_prompt_len=48)
    scorer = RankerScorer(spec, RankerHead.for_spec(spec), model.config, model.params)
    assert scorer.bucket_lengths() == [16, 32, 48]
    assert scorer.warmup(batch_sizes=(1,)) == 3
    assert scorer.score([[1, 2, 3]]).shape == (1,)
