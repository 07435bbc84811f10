"""One entry point for getting a runnable model: `load_model(source) -> LoadedModel(config, params, tokenizer)`.

`source` is None (the `LTR_JAX_MODEL` environment variable if set, else the embedded default SmolLM2-135M-Instruct
GGUF, downloaded once into the user cache), a path to a `.gguf` file, or a Hugging Face checkpoint directory.
Params are the plain dict of float32 numpy arrays that `ltr_jax.models.llama` consumes: `(in, out)` matrices, Q/K
in Hugging Face rotate-half order (see `gguf_loader` and `hf_checkpoint` for the two file formats).
"""

from __future__ import annotations

import os
from pathlib import Path

from ltr_jax.models.config import LoadedModel
from ltr_jax.models.default_model import DEFAULT_MODEL_ID, MODEL_ENV_VAR, default_model_path, ensure_default_model
from ltr_jax.models.gguf_loader import GGUFError, load_gguf
from ltr_jax.models.hf_checkpoint import CheckpointError, load_hf_checkpoint
from ltr_jax.models.tokenizer import ChatTokenizer

__all__ = ["CheckpointError", "GGUFError", "LoadedModel", "load_model", "resolve_dtype", "resolve_source"]


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


def load_model(source: str | os.PathLike[str] | None = None, dtype: str = "auto", seed: int = 0) -> LoadedModel:
    """Load config, float32 params and tokenizer from a GGUF file or a Hugging Face checkpoint directory
    (or the random test model for source "tiny").

    `dtype` sets `config.dtype` (weights, activations and KV cache; "auto": `resolve_dtype`); the params stay
    float32 numpy until the model is built. `seed` only matters for "tiny" (its random weights).
    """
    dtype = resolve_dtype(dtype)
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
