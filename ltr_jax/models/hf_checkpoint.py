"""Hugging Face checkpoint directories: read them into (`LlamaConfig`, params dict), and write them back.

Owns the HF side of weight loading: `config.json` -> `LlamaConfig` (Llama-family architectures only, "llama3"
rope scaling, tied embeddings, explicit head_dim), weights from `model.safetensors` or from shards listed in
`model.safetensors.index.json` (read with the `safetensors` package, numpy framework; bf16/f16 are widened to
float32), and the reverse: `save_hf_checkpoint` writes a real HF-layout checkpoint (sharded with an index when it
exceeds `max_shard_bytes`), optionally with the tokenizer files, so exported models open in other tools.
HF matrices are `nn.Linear.weight` `[out, in]`; our params dict stores `(in, out)`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ltr_jax.models.config import LlamaConfig, RopeScaling

if TYPE_CHECKING:
    from ltr_jax.models.tokenizer import ChatTokenizer

SUPPORTED_HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_IGNORED_TENSOR_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved; recomputed by us

_LAYER_TENSORS = {  # HF name inside model.layers.{i} -> (params key, is_matrix)
    "input_layernorm.weight": ("attn_norm", False),
    "self_attn.q_proj.weight": ("wq", True),
    "self_attn.k_proj.weight": ("wk", True),
    "self_attn.v_proj.weight": ("wv", True),
    "self_attn.o_proj.weight": ("wo", True),
    "post_attention_layernorm.weight": ("mlp_norm", False),
    "mlp.gate_proj.weight": ("w_gate", True),
    "mlp.up_proj.weight": ("w_up", True),
    "mlp.down_proj.weight": ("w_down", True),
}


class CheckpointError(ValueError):
    """A checkpoint directory is missing files, malformed, truncated, or describes a model we cannot run."""


@dataclass
class HFCheckpoint:
    path: Path
    config: LlamaConfig
    params: dict[str, Any]


# ------------------------------------------------------------------------------------------------------ reading
def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def config_from_hf(cfg: dict[str, Any], path: Path, dtype: str = "float32") -> LlamaConfig:
    """Map a HF `config.json` dict to `LlamaConfig`; `path` is only used in error messages."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if not any(a in SUPPORTED_HF_ARCHITECTURES for a in archs) and not (not archs and model_type == "llama"):
        raise CheckpointError(f"{path}: architecture {archs or model_type!r} is not supported; only Llama-family "
                              f"models ({', '.join(SUPPORTED_HF_ARCHITECTURES)}) can be loaded")
    problems = []
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only silu)")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("attention_bias/mlp_bias are set (Llama has no biases)")
    window, max_pos = cfg.get("sliding_window"), int(cfg.get("max_position_embeddings", 2048))
    if window is not None and int(window) < max_pos:
        problems.append(f"sliding_window={window} < max_position_embeddings={max_pos} (sliding-window attention "
                        f"is not implemented)")
    missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                           "intermediate_size") if k not in cfg]
    if missing:
        problems.append(f"missing keys {missing}")
    if problems:
        raise CheckpointError(f"{path}: cannot run this model: " + "; ".join(problems))
    # transformers >= 5 nests rope settings under "rope_parameters"; older files use rope_theta + rope_scaling
    rope = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    n_heads = int(cfg["num_attention_heads"])
    try:
        return LlamaConfig(
            vocab_size=int(cfg["vocab_size"]), dim=int(cfg["hidden_size"]), n_layers=int(cfg["num_hidden_layers"]),
            n_heads=n_heads, n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
            ffn_dim=int(cfg["intermediate_size"]),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // n_heads),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=theta,
            rope_scaling=_rope_scaling(scaling, path), tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=max_pos, dtype=dtype,
            name=str(cfg.get("_name_or_path") or path.parent.name or "llama"),
        )
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def _rope_scaling(scaling: dict[str, Any] | None, path: Path) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise CheckpointError(f"{path}: rope_scaling type {kind!r} is not supported (only 'llama3')")
    try:
        return RopeScaling(factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
                           high_freq_factor=float(scaling["high_freq_factor"]),
                           original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    except KeyError as exc:
        raise CheckpointError(f"{path}: llama3 rope_scaling lacks {exc.args[0]!r}") from exc


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """All tensors of one .safetensors file as float32 numpy arrays; errors name the file."""
    from safetensors import SafetensorError, safe_open

    if not file.is_file():
        raise CheckpointError(f"{file}: missing")
    out = {}
    try:
        with safe_open(str(file), framework="numpy") as fh:
            for name in fh.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                out[name] = np.asarray(fh.get_tensor(name), dtype=np.float32)
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{file}: malformed or truncated safetensors file ({exc})") from exc
    return out


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, or the single file."""
    index = directory / INDEX_FILE
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: has no 'weight_map' object")
        files = [directory / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise CheckpointError(f"{index}: lists shard(s) {absent} that are missing from {directory}")
        return files
    single = directory / SINGLE_FILE
    if single.is_file():
        return [single]
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        raise CheckpointError(f"{directory}: has {len(shards)} .safetensors file(s) but no {INDEX_FILE}")
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors checkpoints are "
                          f"supported; convert .bin files with transformers' save_pretrained)")


def load_hf_checkpoint(directory: str | Path, dtype: str = "float32") -> HFCheckpoint:
    """Read config.json and the safetensors weights of a HF Llama checkpoint into our params dict."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config = config_from_hf(_read_json(directory / "config.json"), directory / "config.json", dtype=dtype)
    tensors: dict[str, np.ndarray] = {}
    origin: dict[str, Path] = {}
    for file in weight_files(directory):
        for name, arr in read_safetensors(file).items():
            if name in tensors:
                raise CheckpointError(f"{file}: tensor {name} also appears in {origin[name].name}")
            tensors[name], origin[name] = arr, file
    params = params_from_hf_tensors(tensors, config, directory)
    return HFCheckpoint(path=directory, config=config, params=params)


def params_from_hf_tensors(tensors: dict[str, np.ndarray], config: LlamaConfig, where: Path) -> dict[str, Any]:
    from ltr_jax.models.llama import check_params

    used: set[str] = set()

    def take(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"{where}: tensor {name} is missing from the checkpoint")
        used.add(name)
        return tensors[name]

    params: dict[str, Any] = {"embed": take("model.embed_tokens.weight"), "final_norm": take("model.norm.weight")}
    if not config.tie_embeddings:
        params["lm_head"] = np.ascontiguousarray(take("lm_head.weight").T)
    elif "lm_head.weight" in tensors:
        used.add("lm_head.weight")  # a tied checkpoint may still store the (identical) head
    layers = []
    for i in range(config.n_layers):
        layer = {}
        for hf_name, (key, is_matrix) in _LAYER_TENSORS.items():
            w = take(f"model.layers.{i}.{hf_name}")
            layer[key] = np.ascontiguousarray(w.T) if is_matrix else w
        layers.append(layer)
    params["layers"] = layers
    unused = sorted(n for n in set(tensors) - used if not n.endswith(_IGNORED_TENSOR_SUFFIXES))
    if unused:
        raise CheckpointError(f"{where}: unexpected tensors for a {config.n_layers}-layer Llama model: "
                              f"{unused[:8]}{' ...' if len(unused) > 8 else ''}")
    try:
        check_params(config, params)
    except ValueError as exc:
        raise CheckpointError(f"{where}: tensor shapes do not match config.json: {exc}") from exc
    return params


# ------------------------------------------------------------------------------------------------------ writing
def hf_config_dict(config: LlamaConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A transformers-compatible config.json for `config`."""
    out: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": config.vocab_size,
        "hidden_size": config.dim, "intermediate_size": config.ffn_dim, "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads, "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim, "hidden_act": "silu", "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta, "rope_scaling": None, "tie_word_embeddings": config.tie_embeddings,
        "max_position_embeddings": config.max_position_embeddings, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": torch_dtype, "_name_or_path": config.name,
    }
    if config.rope_scaling is not None:
        rs = config.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor, "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
    return out


def hf_tensors_from_params(config: LlamaConfig, params: dict[str, Any]) -> dict[str, np.ndarray]:
    """Our params dict -> HF tensor names and [out, in] orientation (float32)."""
    from ltr_jax.models.llama import check_params

    check_params(config, params)

    def f32(a: Any) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(a, dtype=np.float32))

    out = {"model.embed_tokens.weight": f32(params["embed"]), "model.norm.weight": f32(params["final_norm"])}
    if not config.tie_embeddings:
        out["lm_head.weight"] = f32(np.asarray(params["lm_head"]).T)
    for i, layer in enumerate(params["layers"]):
        for hf_name, (key, is_matrix) in _LAYER_TENSORS.items():
            arr = np.asarray(layer[key])
            out[f"model.layers.{i}.{hf_name}"] = f32(arr.T if is_matrix else arr)
    return out


def save_hf_checkpoint(directory: str | Path, config: LlamaConfig, params: dict[str, Any],
                       tokenizer: ChatTokenizer | str | Path | None = None, max_shard_bytes: int = 2 * 2**30,
                       dtype: str = "float32") -> Path:
    """Write config.json + safetensors weights (sharded with an index above `max_shard_bytes`).

    `tokenizer` may be a `ChatTokenizer` (writes tokenizer.json, tokenizer_config.json with the chat template
    and special tokens, generation_config.json with the stop ids) or a path to an existing tokenizer.json.
    `dtype` is the on-disk dtype: float32, bfloat16 or float16. Existing `model*.safetensors` files and the index
    in `directory` are replaced, so a re-export never leaves stale shards behind.
    """
    from safetensors.numpy import save_file

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype={dtype!r}: expected float32, bfloat16 or float16")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float32": np.float32, "float16": np.float16}.get(dtype)
    if np_dtype is None:
        import ml_dtypes

        np_dtype = ml_dtypes.bfloat16
    tensors = {k: v.astype(np_dtype) for k, v in hf_tensors_from_params(config, params).items()}
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in tensors.items():
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata=meta)
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / fname), metadata=meta)
            weight_map.update({name: fname for name in shard})
        index = {"metadata": {"total_size": int(sum(a.nbytes for a in tensors.values()))},
                 "weight_map": weight_map}
        _write_json(directory / INDEX_FILE, index)
    _write_json(directory / "config.json", hf_config_dict(config, torch_dtype=dtype))
    if tokenizer is not None:
        save_tokenizer(directory, tokenizer)
    return directory


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def save_tokenizer(directory: Path, tokenizer: ChatTokenizer | str | Path) -> None:
    """Write ``tokenizer`` into ``directory`` as Hugging Face tokenizer files (`tokenizer.json`, `tokenizer_config.json`
    with the chat template and special tokens, `generation_config.json` with the stop ids), which
    `transformers.AutoTokenizer` and `ChatTokenizer.from_hf_dir` read; a path copies an existing tokenizer.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, (str, Path)):
        src = Path(tokenizer)
        if not src.is_file():
            raise FileNotFoundError(f"{src}: tokenizer.json to copy is missing")
        (directory / "tokenizer.json").write_bytes(src.read_bytes())
        return
    tokenizer.tokenizer.save(str(directory / "tokenizer.json"))
    cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tokenizer.add_bos,
                           "clean_up_tokenization_spaces": False}
    if tokenizer.bos_token is not None:
        cfg["bos_token"] = tokenizer.bos_token
    if tokenizer.eos_token is not None:
        cfg["eos_token"] = tokenizer.eos_token
    if tokenizer.chat_template:
        cfg["chat_template"] = tokenizer.chat_template
    _write_json(directory / "tokenizer_config.json", cfg)
    gen: dict[str, Any] = {"eos_token_id": list(tokenizer.stop_token_ids)}
    if tokenizer.bos_token_id is not None:
        gen["bos_token_id"] = tokenizer.bos_token_id
    _write_json(directory / "generation_config.json", gen)
