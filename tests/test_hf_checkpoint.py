"""Hugging Face checkpoints: save/load round trips (GQA, llama3 rope, shards, bf16), a checkpoint written by
transformers itself, and clear errors for broken directories."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ltr_jax.models.config import RopeScaling, tiny_config
from ltr_jax.models.hf_checkpoint import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from ltr_jax.models.llama import init_random_params, reference_forward
from ltr_jax.models.loading import load_model
from ltr_jax.models.tokenizer import ChatTokenizer

FIXTURES = Path(__file__).resolve().parent / "fixtures"

TOKENS = np.array([[5, 1, 77, 200, 3, 3, 150, 42, 9, 0, 255, 18]], np.int32)


def _cfg(**kw):
    base = {"n_heads": 4, "n_kv_heads": 2, "rope_scaling": RopeScaling(8.0, 1.0, 4.0, 32), "tie_embeddings": False}
    base.update(kw)
    return tiny_config(**base)


@pytest.mark.parametrize("tied", [False, True])
def test_sharded_round_trip_gives_identical_logits(tmp_path, tied):
    cfg = _cfg(tie_embeddings=tied)
    params = init_random_params(cfg, seed=5)
    save_hf_checkpoint(tmp_path, cfg, params, max_shard_bytes=40_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (tmp_path / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    ckpt = load_hf_checkpoint(tmp_path)
    assert ckpt.config.replace(name=cfg.name) == cfg
    for key in ("embed", "final_norm") + (() if tied else ("lm_head",)):
        np.testing.assert_array_equal(ckpt.params[key], params[key])
    np.testing.assert_array_equal(ckpt.params["layers"][1]["wk"], params["layers"][1]["wk"])
    np.testing.assert_allclose(np.asarray(reference_forward(ckpt.config, ckpt.params, TOKENS)),
                               np.asarray(reference_forward(cfg, params, TOKENS)), atol=1e-6)


def test_bf16_single_file_round_trip(tmp_path):
    import ml_dtypes

    cfg = _cfg()
    params = init_random_params(cfg, seed=6)
    save_hf_checkpoint(tmp_path, cfg, params, dtype="bfloat16")
    assert (tmp_path / "model.safetensors").is_file()
    assert not (tmp_path / "model.safetensors.index.json").exists()
    ckpt = load_hf_checkpoint(tmp_path)
    expected = params["layers"][0]["w_up"].astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(ckpt.params["layers"][0]["w_up"], expected)
    assert ckpt.params["embed"].dtype == np.float32


def test_checkpoint_written_by_transformers_matches_its_logits():
    """tests/fixtures/tiny_llama3_hf was saved by transformers (bf16, 3 shards, GQA 4/2, untied, llama3 rope with
    original context 32) together with transformers' float32 logits; see scripts/make_reference_logits.py."""
    ckpt = load_hf_checkpoint(FIXTURES / "tiny_llama3_hf")
    ref = np.load(FIXTURES / "tiny_llama3_reference_logits.npz")
    rs = ckpt.config.rope_scaling
    assert (ckpt.config.n_heads, ckpt.config.n_kv_heads, ckpt.config.tie_embeddings) == (4, 2, False)
    assert rs == RopeScaling(8.0, 1.0, 4.0, 32)
    logits = np.asarray(reference_forward(ckpt.config, ckpt.params, ref["tokens"][None]))[0]
    # identical bf16 weights, float32 math on both sides: only summation-order rounding differs
    assert np.abs(logits - ref["logits"]).max() < 1e-4
    # negative control: without the llama3 scaling the later positions disagree clearly
    plain = np.asarray(reference_forward(ckpt.config.replace(rope_scaling=None), ckpt.params,
                                         ref["tokens"][None]))[0]
    assert np.abs(plain - ref["logits"]).max() > 1e-2


def test_load_model_from_hf_dir_with_tokenizer(tmp_path, tiny_bpe):
    meta, trained = tiny_bpe
    tok = ChatTokenizer.from_gguf_metadata(meta, source="tiny")
    cfg = _cfg(vocab_size=tok.vocab_size)
    params = init_random_params(cfg, seed=7)
    save_hf_checkpoint(tmp_path, cfg, params, tokenizer=tok, max_shard_bytes=60_000)
    loaded = load_model(str(tmp_path))
    assert loaded.tokenizer.encode("Paris, France") == trained.encode("Paris, France").ids
    assert loaded.tokenizer.stop_token_ids == tok.stop_token_ids
    np.testing.assert_array_equal(loaded.params["layers"][1]["w_down"], params["layers"][1]["w_down"])
    no_tok = tmp_path / "no_tok"
    save_hf_checkpoint(no_tok, cfg, params)
    with pytest.raises(FileNotFoundError, match=r"no_tok/tokenizer.json: missing"):
        load_model(str(no_tok))


@pytest.fixture
def saved(tmp_path):
    cfg = _cfg()
    save_hf_checkpoint(tmp_path / "ckpt", cfg, init_random_params(cfg, seed=8), max_shard_bytes=40_000)
    return tmp_path / "ckpt"


def _edit_config(directory, **changes):
    cfg = json.loads((directory / "config.json").read_text())
    cfg.update(changes)
    (directory / "config.json").write_text(json.dumps(cfg))


def test_unknown_architecture_is_named(saved):
    _edit_config(saved, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(CheckpointError, match=r"config.json: architecture \['GPT2LMHeadModel'\] is not supported"):
        load_hf_checkpoint(saved)


def test_unsupported_config_features_are_named(saved):
    _edit_config(saved, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(CheckpointError, match=r"config.json: rope_scaling type 'yarn' is not supported"):
        load_hf_checkpoint(saved)
    _edit_config(saved, rope_scaling=None, attention_bias=True)
    with pytest.raises(CheckpointError, match=r"config.json: cannot run this model: attention_bias"):
        load_hf_checkpoint(saved)


def test_bad_json_config(saved):
    (saved / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_hf_checkpoint(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config.json: missing"):
        load_hf_checkpoint(saved)


def test_missing_shard_is_named(saved):
    victim = sorted(saved.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=rf"index.json: lists shard\(s\) \['{victim.name}'\] that are missing"):
        load_hf_checkpoint(saved)


def test_truncated_and_malformed_safetensors_are_named(saved):
    shard = min(saved.glob("model-*.safetensors"))
    backup = shard.read_bytes()
    shard.write_bytes(backup[: len(backup) - 100])
    with pytest.raises(CheckpointError, match=rf"{shard.name}: malformed or truncated safetensors"):
        load_hf_checkpoint(saved)
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=rf"{shard.name}: malformed or truncated safetensors"):
        load_hf_checkpoint(saved)
    shard.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match=rf"{shard.name}: malformed or truncated safetensors"):
        load_hf_checkpoint(saved)


def test_missing_tensor_and_wrong_shape_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    cfg = _cfg()
    save_hf_checkpoint(tmp_path, cfg, init_random_params(cfg, seed=9))
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"tensor model.layers.1.mlp.up_proj.weight is missing"):
        load_hf_checkpoint(tmp_path)
    _edit_config(tmp_path, num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*model.layers.1"):
        load_hf_checkpoint(tmp_path)
    save_hf_checkpoint(tmp_path, cfg, init_random_params(cfg, seed=9))
    _edit_config(tmp_path, intermediate_size=64)
    with pytest.raises(CheckpointError, match=r"tensor shapes do not match config.json: .*w_gate: shape \(64, 128\)"):
        load_hf_checkpoint(tmp_path)


def test_no_weights_at_all(tmp_path):
    cfg = _cfg()
    save_hf_checkpoint(tmp_path, cfg, init_random_params(cfg))
    (tmp_path / "model.safetensors").rename(tmp_path / "weights.safetensors")
    with pytest.raises(CheckpointError, match=r"has 1 .safetensors file\(s\) but no model.safetensors.index.json"):
        load_hf_checkpoint(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model.safetensors or model.safetensors.index.json"):
        load_hf_checkpoint(tmp_path)
