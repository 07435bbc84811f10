"""GGUF loading: metadata -> LlamaConfig, dequantization, llama.cpp name mapping and Q/K un-permutation, errors.

Test files are written with gguf's own `GGUFWriter` the way llama.cpp's HF converter writes them: HF `[out, in]`
matrices, with Q/K rows permuted for interleaved rope (the converter's formula, restated here on the writer side).
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
from gguf.quants import quantize

from ltr_jax.models.config import tiny_config
from ltr_jax.models.gguf_loader import GGUFError, load_gguf, unpermute_qk_rows
from ltr_jax.models.llama import init_random_params, reference_forward
from ltr_jax.models.loading import load_model

Q8 = gguf.GGMLQuantizationType.Q8_0
_LAYER_NAMES = {"attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
                "mlp_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down"}


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q_proj/k_proj rows (pair (i, i+hd/2) -> adjacent rows 2i, 2i+1)."""
    out, hd = w.shape[0], w.shape[0] // n_heads
    permuted = np.empty_like(w)
    for h in range(n_heads):
        for i in range(hd // 2):
            permuted[h * hd + 2 * i] = w[h * hd + i]
            permuted[h * hd + 2 * i + 1] = w[h * hd + hd // 2 + i]
    assert permuted.shape[0] == out
    return permuted


def write_llama_gguf(path, config, params, tokenizer_meta=None, quant_matrices=False, arch="llama",
                     extra_tensors=None, skip=(), rope_freqs=None):
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(config.n_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.dim)
    w.add_feed_forward_length(config.ffn_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_dimension_count(config.head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.norm_eps)
    w.add_vocab_size(config.vocab_size)
    if tokenizer_meta:
        w.add_tokenizer_model(tokenizer_meta["tokenizer.ggml.model"])
        w.add_tokenizer_pre(tokenizer_meta["tokenizer.ggml.pre"])
        w.add_token_list(tokenizer_meta["tokenizer.ggml.tokens"])
        w.add_token_merges(tokenizer_meta["tokenizer.ggml.merges"])
        w.add_token_types(tokenizer_meta["tokenizer.ggml.token_type"])
        w.add_bos_token_id(tokenizer_meta["tokenizer.ggml.bos_token_id"])
        w.add_eos_token_id(tokenizer_meta["tokenizer.ggml.eos_token_id"])
        w.add_chat_template(tokenizer_meta["tokenizer.chat_template"])

    def add(name, arr, matrix=False):
        if name in skip:
            return
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if matrix and quant_matrices:
            w.add_tensor(name, quantize(arr, Q8), raw_dtype=Q8)
        else:
            w.add_tensor(name, arr)

    add("token_embd.weight", params["embed"], matrix=True)
    for i, layer in enumerate(params["layers"]):
        for key, name in _LAYER_NAMES.items():
            arr = np.asarray(layer[key])
            if arr.ndim == 2:
                arr = arr.T  # ours (in, out) -> HF/GGUF numpy [out, in]
                if key == "wq":
                    arr = llama_cpp_permute(arr, config.n_heads)
                elif key == "wk":
                    arr = llama_cpp_permute(arr, config.n_kv_heads)
            add(f"blk.{i}.{name}.weight", arr, matrix=arr.ndim == 2)
    add("output_norm.weight", params["final_norm"])
    if not config.tie_embeddings:
        add("output.weight", np.asarray(params["lm_head"]).T, matrix=True)
    if rope_freqs is not None:
        add("rope_freqs.weight", rope_freqs)
    for name, arr in (extra_tensors or {}).items():
        add(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _assert_params_equal(a, b, atol=0.0):
    assert set(a) == set(b)
    for key in a:
        if key == "layers":
            for la, lb in zip(a["layers"], b["layers"], strict=True):
                for k in la:
                    np.testing.assert_allclose(la[k], lb[k], atol=atol, rtol=0, err_msg=k)
        else:
            np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=0, err_msg=key)


def test_unpermute_inverts_llama_cpp_permutation():
    rng = np.random.default_rng(0)
    for heads, hd in [(4, 8), (3, 64), (1, 4)]:
        w = rng.standard_normal((heads * hd, 5)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_qk_rows(llama_cpp_permute(w, heads), heads), w)
        assert not np.array_equal(llama_cpp_permute(w, heads), w)


@pytest.mark.parametrize("tied", [False, True])
def test_f32_gguf_round_trip_gives_identical_params_and_logits(tmp_path, tiny_bpe, tied):
    meta, _ = tiny_bpe
    cfg = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]), n_heads=4, n_kv_heads=2, tie_embeddings=tied)
    params = init_random_params(cfg, seed=1)
    path = write_llama_gguf(tmp_path / "m.gguf", cfg, params, meta)
    model = load_gguf(path)
    assert model.config.replace(name="tiny") == cfg.replace(norm_eps=model.config.norm_eps)
    assert math.isclose(model.config.norm_eps, cfg.norm_eps, rel_tol=1e-6)
    _assert_params_equal(model.params, params)
    # owned, writable arrays (not read-only views into the file mapping)
    assert all(a.flags.writeable for a in model.params["layers"][0].values())
    assert model.params["final_norm"].flags.writeable
    tokens = np.array([[3, 17, 200, 5, 9, 64, 1, 99]], np.int32)
    np.testing.assert_allclose(np.asarray(reference_forward(model.config, model.params, tokens)),
                               np.asarray(reference_forward(cfg, params, tokens)), atol=1e-5)


def test_q8_0_gguf_dequantizes_close_to_source(tmp_path, tiny_bpe):
    meta, _ = tiny_bpe
    cfg = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]))
    params = init_random_params(cfg, seed=2)
    path = write_llama_gguf(tmp_path / "q8.gguf", cfg, params, meta, quant_matrices=True)
    model = load_gguf(path)
    # Q8_0: 8-bit with one scale per 32 values -> error <= max|block| / 127 / 2; weights are ~N(0, 0.02)
    _assert_params_equal(model.params, params, atol=0.15 / 127)
    diff = np.abs(model.params["layers"][0]["wq"] - params["layers"][0]["wq"]).max()
    assert 0 < diff  # really quantized
    tokens = np.array([[1, 2, 3, 4, 5]], np.int32)
    ours = np.asarray(reference_forward(model.config, model.params, tokens))
    ref = np.asarray(reference_forward(cfg, params, tokens))
    assert np.abs(ours - ref).max() < 0.05 * np.abs(ref).max()


def test_load_model_from_gguf_builds_tokenizer(tmp_path, tiny_bpe):
    meta, trained = tiny_bpe
    cfg = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]))
    path = write_llama_gguf(tmp_path / "m.gguf", cfg, init_random_params(cfg, seed=3), meta)
    loaded = load_model(str(path))
    assert loaded.source == str(path)
    assert loaded.tokenizer.encode("Paris 2024") == trained.encode("Paris 2024").ids
    assert "<|im_start|>assistant\n" in loaded.tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def _llama3_rope_divisors(hd, theta, factor, low, high, original):
    """llama.cpp's converter stores these per-frequency divisors as the rope_freqs tensor."""
    out = []
    for i in range(0, hd, 2):
        freq = 1.0 / theta ** (i / hd)
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, np.float32)


def test_rope_freqs_tensor_maps_to_llama3_scaling(tmp_path, tiny_bpe):
    meta, _ = tiny_bpe
    cfg = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]), rope_theta=10000.0)
    params = init_random_params(cfg, seed=4)
    divisors = _llama3_rope_divisors(cfg.head_dim, cfg.rope_theta, 8.0, 1.0, 4.0, 8192)
    assert len(set(divisors.round(3))) > 2  # all three regions present for this head_dim/theta
    model = load_gguf(write_llama_gguf(tmp_path / "r.gguf", cfg, params, meta, rope_freqs=divisors))
    rs = model.config.rope_scaling
    assert rs is not None and (rs.factor, rs.low_freq_factor, rs.high_freq_factor,
                               rs.original_max_position_embeddings) == (8.0, 1.0, 4.0, 8192)
    odd = divisors.copy()
    odd[1] *= 1.5
    with pytest.raises(GGUFError, match=r"o\.gguf: rope_freqs does not match llama3 rope scaling"):
        load_gguf(write_llama_gguf(tmp_path / "o.gguf", cfg, params, meta, rope_freqs=odd))


def test_unknown_architecture_names_file_and_arch(tmp_path, tiny_bpe):
    meta, _ = tiny_bpe
    cfg = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]))
    path = write_llama_gguf(tmp_path / "phi.gguf", cfg, init_random_params(cfg), meta, arch="phi3")
    with pytest.raises(GGUFError, match=r"phi\.gguf: general.architecture is 'phi3'"):
        load_gguf(path)


def test_missing_and_unexpected_tensors(tmp_path, tiny_bpe):
    meta, _ = tiny_bpe
    cfg = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]))
    params = init_random_params(cfg)
    path = write_llama_gguf(tmp_path / "a.gguf", cfg, params, meta, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFError, match=r"a\.gguf: tensor blk.1.ffn_up.weight is missing"):
        load_gguf(path)
    path = write_llama_gguf(tmp_path / "b.gguf", cfg, params, meta,
                            extra_tensors={"blk.0.attn_q.bias": np.zeros(cfg.dim, np.float32)})
    with pytest.raises(GGUFError, match=r"b\.gguf: unexpected tensors .*blk.0.attn_q.bias"):
        load_gguf(path)


def test_truncated_and_malformed_files_fail_with_file_name(tmp_path, tiny_bpe):
    meta, _ = tiny_bpe
    cfg = tiny_config(vocab_size=len(meta["tokenizer.ggml.tokens"]))
    good = write_llama_gguf(tmp_path / "good.gguf", cfg, init_random_params(cfg), meta).read_bytes()
    for name, data in [("tail.gguf", good[: len(good) - 1000]), ("head.gguf", good[:200]),
                       ("mid.gguf", good[: len(good) // 2])]:
        bad = tmp_path / name
        bad.write_bytes(data)
        with pytest.raises(GGUFError, match=rf"{name.replace('.', '[.]')}: .*(truncated|malformed)"):
            load_gguf(bad)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF" + np.random.default_rng(0).bytes(4000))
    with pytest.raises(GGUFError, match=r"junk\.gguf: malformed or truncated"):
        load_gguf(junk)
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(GGUFError, match=r"notes\.gguf: not a GGUF file"):
        load_gguf(text)
    with pytest.raises(GGUFError, match=r"absent\.gguf: no such GGUF file"):
        load_gguf(tmp_path / "absent.gguf")


@pytest.mark.integration
def test_smollm2_config_and_tensors(smollm2_model):
    from ltr_jax.models.config import PRESETS

    cfg = smollm2_model.config
    assert cfg.replace(name="smollm2-135m", norm_eps=1e-5) == PRESETS["smollm2-135m"]
    assert "lm_head" not in smollm2_model.params and len(smollm2_model.params["layers"]) == 30
    assert all(np.isfinite(smollm2_model.params["layers"][i]["wq"]).all() for i in (0, 29))
