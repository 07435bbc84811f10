"""Read a llama.cpp GGUF file into a `LlamaConfig`, a float32 params dict, and its metadata.

Owns the GGUF side of weight loading: parsing with `gguf.GGUFReader`, dequantizing every tensor (Q4_1, Q8_0, F16,
BF16, K-quants ... whatever `gguf.quants.dequantize` knows) to float32, mapping llama.cpp tensor names to our params
dict, and undoing the row permutation that llama.cpp's HF->GGUF converter applies to Q and K.

Orientation: a GGUF tensor with ggml shape `ne = [in, out]` dequantizes to a numpy array `[out, in]`, i.e. the
Hugging Face `nn.Linear.weight` layout; our params dict stores `(in, out)`, so matrices are transposed here.

Q/K permutation: llama.cpp's rope pairs adjacent dimensions (2i, 2i+1) of each head, Hugging Face's "rotate_half"
pairs (i, i + head_dim/2). The converter therefore reorders the output rows of q_proj/k_proj within each head:
HF row `j * head_dim/2 + i` (j in {0, 1}) goes to GGUF row `2 * i + j`. `unpermute_qk_rows` inverts exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ltr_jax.models.config import LlamaConfig, RopeScaling

SUPPORTED_GGUF_ARCHITECTURES = ("llama",)

_LAYER_TENSORS = {  # llama.cpp name -> (params key, is_matrix)
    "attn_norm": ("attn_norm", False),
    "attn_q": ("wq", True),
    "attn_k": ("wk", True),
    "attn_v": ("wv", True),
    "attn_output": ("wo", True),
    "ffn_norm": ("mlp_norm", False),
    "ffn_gate": ("w_gate", True),
    "ffn_up": ("w_up", True),
    "ffn_down": ("w_down", True),
}


class GGUFError(ValueError):
    """A GGUF file is missing, malformed, truncated, or describes a model we cannot run."""


@dataclass
class GGUFModel:
    path: Path
    config: LlamaConfig
    params: dict[str, Any]
    metadata: dict[str, Any]  # every key/value field (GGUF.* header fields excluded), as plain Python values


def unpermute_qk_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's interleaved-rope row order for a [n_heads * head_dim, in] Q or K matrix."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"cannot un-permute {rows} rows into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_gguf(path: str | Path):
    """Open a GGUF file with `gguf.GGUFReader`, turning any parse failure into a GGUFError naming the file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad or short files
        raise GGUFError(f"{path}: malformed or truncated GGUF file ({type(exc).__name__}: {exc})") from exc
    for tensor in reader.tensors:
        if tensor.data.nbytes != int(tensor.n_bytes):
            raise GGUFError(f"{path}: tensor {tensor.name} has {tensor.data.nbytes} of its {int(tensor.n_bytes)} "
                            f"bytes; the file is truncated")
    return reader


def gguf_metadata(reader) -> dict[str, Any]:
    """All key/value fields as Python values (strings, numbers, lists)."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        out[key] = field.contents()
    return out


def load_gguf(path: str | Path, dtype: str = "float32") -> GGUFModel:
    """Read, validate, dequantize and map a llama-architecture GGUF file."""
    path = Path(path)
    reader = read_gguf(path)
    try:
        metadata = gguf_metadata(reader)
    except Exception as exc:
        raise GGUFError(f"{path}: unreadable metadata ({type(exc).__name__}: {exc})") from exc
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_metadata(metadata, tensors, path, dtype=dtype)
    params = params_from_tensors(tensors, config, path)
    return GGUFModel(path=path, config=config, params=params, metadata=metadata)


def _require(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise GGUFError(f"{path}: metadata key {key!r} is missing")
    return meta[key]


def config_from_metadata(meta: dict[str, Any], tensors: dict[str, Any], path: Path,
                         dtype: str = "float32") -> LlamaConfig:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_GGUF_ARCHITECTURES:
        raise GGUFError(f"{path}: general.architecture is {arch!r}; only {SUPPORTED_GGUF_ARCHITECTURES} "
                        f"(Llama-family) models are supported")
    a = arch
    dim = int(_require(meta, f"{a}.embedding_length", path))
    n_heads = int(_require(meta, f"{a}.attention.head_count", path))
    n_kv = int(meta.get(f"{a}.attention.head_count_kv", n_heads))
    head_dim = int(meta.get(f"{a}.attention.key_length", dim // n_heads))
    if int(meta.get(f"{a}.attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{path}: attention.value_length differs from key_length; not a Llama model")
    rope_dims = int(meta.get(f"{a}.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(f"{path}: rope.dimension_count={rope_dims} != head_dim={head_dim} (partial rotary "
                        f"embeddings are not supported)")
    if "token_embd.weight" not in tensors:
        raise GGUFError(f"{path}: tensor token_embd.weight is missing")
    vocab = meta.get(f"{a}.vocab_size")
    if vocab is None:
        vocab = len(meta["tokenizer.ggml.tokens"]) if "tokenizer.ggml.tokens" in meta else None
    if vocab is None:
        vocab = int(tensors["token_embd.weight"].shape[-1])
    rope_theta = float(meta.get(f"{a}.rope.freq_base", 10000.0))
    context = int(meta.get(f"{a}.context_length", 2048))
    name = str(meta.get("general.name") or path.stem)
    config = LlamaConfig(
        vocab_size=int(vocab), dim=dim, n_layers=int(_require(meta, f"{a}.block_count", path)),
        n_heads=n_heads, n_kv_heads=n_kv, ffn_dim=int(_require(meta, f"{a}.feed_forward_length", path)),
        head_dim=head_dim, norm_eps=float(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=rope_theta, rope_scaling=None, tie_embeddings="output.weight" not in tensors,
        max_position_embeddings=context, dtype=dtype, name=name,
    )
    scaling = _rope_scaling(meta, tensors, config, path)
    return config.replace(rope_scaling=scaling) if scaling is not None else config


def _rope_scaling(meta: dict[str, Any], tensors: dict[str, Any], config: LlamaConfig,
                  path: Path) -> RopeScaling | None:
    """Llama-3.1 rope scaling. llama.cpp stores it as a `rope_freqs` tensor of per-frequency divisors; we accept
    it when it equals the llama3 formula with the standard low/high factors (1, 4) and the factor it implies."""
    from ltr_jax.models.llama import rope_frequencies

    a = meta["general.architecture"]
    kind = meta.get(f"{a}.rope.scaling.type")
    if kind not in (None, "none", "llama3"):
        raise GGUFError(f"{path}: rope.scaling.type {kind!r} is not supported (only llama3)")
    if "rope_freqs.weight" not in tensors:
        if kind == "llama3":
            raise GGUFError(f"{path}: rope.scaling.type is llama3 but the rope_freqs tensor is missing")
        return None
    divisors = _dequantize(tensors["rope_freqs.weight"], path).reshape(-1).astype(np.float64)
    if divisors.shape[0] != config.head_dim // 2:
        raise GGUFError(f"{path}: rope_freqs has {divisors.shape[0]} entries, expected {config.head_dim // 2}")
    if np.allclose(divisors, 1.0):
        return None
    original = int(meta.get(f"{a}.rope.scaling.original_context_length", 8192))
    candidate = RopeScaling(factor=float(np.round(divisors.max(), 4)), low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=original)
    plain = rope_frequencies(config)
    scaled = rope_frequencies(config.replace(rope_scaling=candidate))
    if not np.allclose(plain / scaled, divisors, rtol=1e-4, atol=1e-5):
        raise GGUFError(f"{path}: rope_freqs does not match llama3 rope scaling with factor {candidate.factor}, "
                        f"low/high freq factors 1/4, original context {original}; unsupported rope scaling")
    return candidate


def _dequantize(tensor, path: Path) -> np.ndarray:
    from gguf.quants import dequantize

    try:
        out = dequantize(tensor.data, tensor.tensor_type)
    except Exception as exc:
        raise GGUFError(f"{path}: cannot dequantize tensor {tensor.name} of type {tensor.tensor_type.name} "
                        f"({type(exc).__name__}: {exc})") from exc
    # F32/F16 tensors can come back as read-only views of the file mapping: always return an owned array
    return np.array(out, dtype=np.float32, order="C", copy=True)


def params_from_tensors(tensors: dict[str, Any], config: LlamaConfig, path: Path) -> dict[str, Any]:
    from ltr_jax.models.llama import check_params

    used = {"rope_freqs.weight"}

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise GGUFError(f"{path}: tensor {name} is missing")
        used.add(name)
        return _dequantize(tensors[name], path)

    params: dict[str, Any] = {"embed": take("token_embd.weight"), "final_norm": take("output_norm.weight")}
    if not config.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(take("output.weight").T)
    layers = []
    for i in range(config.n_layers):
        layer = {}
        for gguf_name, (key, is_matrix) in _LAYER_TENSORS.items():
            w = take(f"blk.{i}.{gguf_name}.weight")
            if gguf_name == "attn_q":
                w = _unpermute(w, config.n_heads, f"blk.{i}.attn_q.weight", path)
            elif gguf_name == "attn_k":
                w = _unpermute(w, config.n_kv_heads, f"blk.{i}.attn_k.weight", path)
            layer[key] = np.ascontiguousarray(w.T) if is_matrix else w.reshape(-1)
        layers.append(layer)
    params["layers"] = layers
    unused = sorted(set(tensors) - used)
    if unused:
        raise GGUFError(f"{path}: unexpected tensors for a Llama model: {unused[:8]}"
                        f"{' ...' if len(unused) > 8 else ''} (block_count says {config.n_layers} layers)")
    try:
        check_params(config, params)
    except ValueError as exc:
        raise GGUFError(f"{path}: tensor shapes do not match the metadata: {exc}") from exc
    return params


def _unpermute(w: np.ndarray, n_heads: int, name: str, path: Path) -> np.ndarray:
    if w.ndim != 2 or w.shape[0] % n_heads or (w.shape[0] // n_heads) % 2:
        raise GGUFError(f"{path}: {name} has shape {w.shape}, not [heads({n_heads}) * even head_dim, in]")
    return unpermute_qk_rows(w, n_heads)
