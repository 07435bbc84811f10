"""One entry point for getting a runnable model: `load_model(source) -> LoadedModel(config, params, tokenizer)`.

`source` is None (the `LTR_JAX_MODEL` environment variable if set, else the embedded default SmolLM2-135M-Instruct
GGUF, downloaded once into the user cache), a path to a `.gguf` file, or a Hugging Face checkpoint directory.
Params are the plain dict of float32 numpy arrays that `ltr_jax.models.llama` consumes: `(in, out)` matrices, Q/K
in Hugging Face rotate-half order (see `gguf_loader` and `hf_checkpoint` for the two file formats).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from ltr_jax.models.config import LoadedModel
from ltr_jax.models.default_model import DEFAULT_MODEL_ID, MODEL_ENV_VAR, default_model_path, ensure_default_model
from ltr_jax.models.gguf_loader import GGUFError, load_gguf
from ltr_jax.models.hf_checkpoint import CheckpointError, load_hf_checkpoint
from ltr_jax.models.tokenizer import ChatTokenizer

__all__ = ["CheckpointError", "GGUFError", "LoadedModel", "load_model", "resolve_dtype", "resolve_source",
           "resolve_weight_dtype"]


def resolve_source(source: str | os.PathLike[str] | None) -> Path:
    """The file/directory to load: explicit source, else $LTR_JAX_MODEL, else the (downloaded) default GGUF."""
    if source is None or str(source) == "":
        source = os.environ.get(MODEL_ENV_VAR) or None
    if source is None:
        return ensure_default_model()
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model source {str(source)!r} does not exist; give a .gguf file, a Hugging Face "
                                f"checkpoint directory, or nothing for the embedded default model")
    return path


TINY_SOURCE = "tiny"  # a random 2-layer test model with a byte-level tokenizer (ltr_jax.models.tiny)


def resolve_dtype(dtype: str) -> str:
    """``model.dtype``: "auto" is bfloat16 on an accelerator (GPU, TPU) and float32 on a CPU (where XLA's bfloat16
    matmuls are several times slower than float32); any other value as given."""
    if dtype != "auto":
        return dtype
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


# decode slots from which bfloat16 weights beat float32 ones on a CPU with bfloat16 matrix instructions: a step's
# matmuls then have that many rows (measured in benchmarks/RESULTS.md, "CPU engine")
BF16_WEIGHTS_MIN_SLOTS = 4


def resolve_weight_dtype(weight_dtype: str, dtype: str, num_slots: int) -> str:
    """``model.weight_dtype`` for an engine of ``num_slots`` decode slots and activations of ``dtype`` ("auto":
    `resolve_dtype`):
    "auto" is bfloat16 on a CPU with bfloat16 matrix instructions (`machine.BF16_MATMUL_FLAGS`) when float32
    activations meet at least `BF16_WEIGHTS_MIN_SLOTS` rows per matmul, else "" (the activations' dtype): a
    decode step of a few rows is bound by reading the weights, which XLA:CPU does fastest in float32."""
    dtype = resolve_dtype(dtype)
    if weight_dtype != "auto":
        return "" if weight_dtype == dtype else weight_dtype
    import jax

    from ltr_jax.machine import BF16_MATMUL_FLAGS, cpu_flags

    cpu_bf16 = jax.default_backend() == "cpu" and bool(cpu_flags() & BF16_MATMUL_FLAGS)
    return "bfloat16" if cpu_bf16 and dtype == "float32" and num_slots >= BF16_WEIGHTS_MIN_SLOTS else ""


def load_model(source: str | os.PathLike[str] | None = None, dtype: str = "auto", seed: int = 0,
               weight_dtype: str = "") -> LoadedModel:
    """Load config, float32 params and tokenizer from a GGUF file or a Hugging Face checkpoint directory
    (or the random test model for source "tiny").

    `dtype` sets `config.dtype` (activations, KV cache and, unless `weight_dtype` says otherwise, weights;
    "auto": `resolve_dtype`), `weight_dtype` sets `config.weight_dtype` (resolved: `resolve_weight_dtype`); the
    params stay float32 numpy until the model is built. `seed` only matters for "tiny" (its random weights).
    """
    dtype = resolve_dtype(dtype)
    loaded = _load(source, dtype, seed)
    if weight_dtype:
        loaded = dataclasses.replace(loaded, config=loaded.config.replace(weight_dtype=weight_dtype))
    return loaded


def _load(source: str | os.PathLike[str] | None, dtype: str, seed: int) -> LoadedModel:
    if source is not None and str(source) == TINY_SOURCE:
        from ltr_jax.models.tiny import tiny_model

        return tiny_model(seed=seed, dtype=dtype)
    path = resolve_source(source)
    if path.is_dir():
        ckpt = load_hf_checkpoint(path, dtype=dtype)
        tokenizer = ChatTokenizer.from_hf_dir(path)
        config, params = ckpt.config, ckpt.params
    elif path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}) and not a directory; give a .gguf "
                             f"file or a Hugging Face checkpoint directory")
        model = load_gguf(path, dtype=dtype)
        try:
            tokenizer = ChatTokenizer.from_gguf_metadata(model.metadata, source=str(path))
        except ValueError as exc:
            raise GGUFError(str(exc)) from exc
        config, params = model.config, model.params
        if path == default_model_path():
            config = config.replace(name=DEFAULT_MODEL_ID)
    else:
        raise ValueError(f"{path}: neither a file nor a directory")
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{config.vocab_size} embedding rows")
    return LoadedModel(config=config, params=params, tokenizer=tokenizer, source=str(path))
