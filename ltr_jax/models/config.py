"""The model configuration: one dataclass that describes every Llama-family model we serve.

It covers SmolLM2-135M (tied embeddings, GQA 9/3), Llama-3.2-1B (tied, llama3 rope scaling), Llama-3-8B and
Llama-3-70B (untied, GQA 32/8 and 64/8). Presets for the published shapes live here too, so benchmarks can build
random-weight models of real sizes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = ("llama", "LlamaForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 "llama3" rope scaling: low frequencies stretched by `factor`, high ones kept, smooth between."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    head_dim: int = 0  # 0 -> dim // n_heads
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = False
    max_position_embeddings: int = 8192
    dtype: str = "float32"  # activations and KV cache: "float32" on CPU, "bfloat16" on GPU
    weight_dtype: str = ""  # the weights' storage and matmul input dtype; "" = dtype (see `param_dtype`)
    name: str = "llama"

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        problems = []
        for f in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "head_dim"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) <= 0:
                problems.append(f"{f}={getattr(self, f)!r} must be a positive integer")
        if not problems and self.n_heads % self.n_kv_heads:
            problems.append(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"dtype={self.dtype!r} must be one of float32, bfloat16, float16")
        if self.weight_dtype not in ("", "float32", "bfloat16", "float16"):
            problems.append(f"weight_dtype={self.weight_dtype!r} must be empty (= dtype) or one of float32, "
                            "bfloat16, float16")
        if problems:
            raise ValueError("invalid LlamaConfig: " + "; ".join(problems))

    @property
    def param_dtype(self) -> str:
        """The weights' dtype: ``weight_dtype``, else ``dtype``. Weights narrower than the activations (bfloat16
        weights, float32 activations: where bfloat16 matmul units make large batches faster) feed each matmul
        their inputs rounded to the weights' dtype, accumulating in the activations' dtype."""
        return self.weight_dtype or self.dtype

    @property
    def q_per_kv(self) -> int:
        return self.n_heads // self.n_kv_heads

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        attn = self.dim * self.head_dim * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LlamaConfig:
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown LlamaConfig keys {unknown}; known keys: {sorted(known)}")
        if isinstance(d.get("rope_scaling"), dict):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)


PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(
        name="smollm2-135m", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
        norm_eps=1e-5, rope_theta=100000.0, tie_embeddings=True, max_position_embeddings=8192,
    ),
    "llama-3.2-1b": LlamaConfig(
        name="llama-3.2-1b", vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_dim=8192,
        rope_theta=500000.0, rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), tie_embeddings=True,
        max_position_embeddings=131072,
    ),
    "llama-3-8b": LlamaConfig(
        name="llama-3-8b", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        rope_theta=500000.0, max_position_embeddings=8192,
    ),
    "llama-3.1-8b": LlamaConfig(
        name="llama-3.1-8b", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
        rope_theta=500000.0, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
    ),
    "llama-3-70b": LlamaConfig(
        name="llama-3-70b", vocab_size=128256, dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
        rope_theta=500000.0, max_position_embeddings=8192,
    ),
}


PRESET_ALIASES = {"llama3-8b": "llama-3-8b", "llama3.1-8b": "llama-3.1-8b", "llama3-70b": "llama-3-70b",
                  "llama3.2-1b": "llama-3.2-1b"}


def preset(name: str) -> LlamaConfig:
    """A published shape by name (``llama3-8b`` or ``llama-3-8b``; ``tiny``: `tiny_config`), for random weights."""
    if name == "tiny":
        return tiny_config()
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of tiny, {', '.join(sorted(PRESETS))} "
                         f"(or {', '.join(PRESET_ALIASES)})")
    return PRESETS[key]


def tiny_config(**overrides: Any) -> LlamaConfig:
    """A few-layer GQA model for unit tests (random weights)."""
    base: dict[str, Any] = {
        "name": "tiny", "vocab_size": 256, "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "ffn_dim": 128,
        "rope_theta": 10000.0, "tie_embeddings": False, "max_position_embeddings": 2048,
    }
    return LlamaConfig(**{**base, **overrides})



@dataclass
class LoadedModel:
    """A runnable model: its config, float32 params and chat tokenizer (`ltr_jax.models.loading.load_model`)."""

    config: LlamaConfig
    params: dict[str, Any]
    tokenizer: Any  # `ltr_jax.models.tokenizer.ChatTokenizer`
    source: str = ""  # the file or directory the weights came from
