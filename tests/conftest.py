"""Shared pytest fixtures: the real SmolLM2 GGUF (downloaded once into the user cache) and a tiny byte-level BPE
tokenizer expressed as GGUF tokenizer metadata (for fast unit tests of the loaders)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest

_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\nprint(add(1, 2))\n",
    "What is the capital of France? The capital of France is Paris.",
    "Numbers 0123456789 and 3.14159, café naïve, 日本語, emoji 😀.",
    "  indented\n\ttabbed\r\n lines  with   spaces ",
]
TINY_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_executables():
    """Drop every compiled executable after each test module. Each XLA:CPU executable holds memory mappings, and
    the whole suite in one process would otherwise pass the kernel's per-process limit (vm.max_map_count, 65,530
    here), where XLA crashes (seen while serializing an executable for the persistent cache)."""
    yield
    import gc

    import jax

    from ltr_jax.machine import release_free_memory

    jax.clear_caches()
    gc.collect()
    release_free_memory()


@pytest.fixture(scope="session")
def smollm2_gguf_path() -> Path:
    """The embedded default model file, fetched on first use (integration tests only)."""
    from ltr_jax.models.default_model import ensure_default_model

    return ensure_default_model()


@pytest.fixture(scope="session")
def smollm2_model(smollm2_gguf_path):
    """SmolLM2-135M-Instruct loaded once per session with our loader, in float32 on every backend (the reference
    logits are float32; bfloat16 is measured by scripts/dtype_agreement.py)."""
    from ltr_jax.models.loading import load_model

    return load_model(str(smollm2_gguf_path), dtype="float32")


def _train_tiny_bpe(pre: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=TINY_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TINY_CORPUS, trainer=trainer)
    return tok


def tiny_bpe_metadata(pre: str = "smollm"):
    """(GGUF-style tokenizer metadata, the trained `tokenizers.Tokenizer` it was taken from)."""
    tok = _train_tiny_bpe(pre)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = [None] * len(vocab)
    for text, idx in vocab.items():
        tokens[idx] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [3 if t in TINY_SPECIAL_TOKENS else 1 for t in tokens]
    meta = {
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.bos_token_id": tokens.index("<|im_start|>"),
        "tokenizer.ggml.eos_token_id": tokens.index("<|endoftext|>"),
        "tokenizer.chat_template": TINY_CHATML_TEMPLATE,
    }
    return meta, tok


@pytest.fixture(scope="session")
def tiny_bpe():
    """(GGUF tokenizer metadata, trained tokenizer) for a ~420-token byte-level BPE with SmolLM2's pre-tokenizer."""
    return tiny_bpe_metadata("smollm")


@pytest.fixture(scope="session")
def tiny_bpe_factory():
    """`tiny_bpe_metadata` itself, for tests that need another pre-tokenizer."""
    return tiny_bpe_metadata


@pytest.fixture(scope="session")
def engine_compile_counts():
    """A callable giving how many variants each of the engine's jitted functions has compiled: the same list before
    and after serving means nothing compiled mid-traffic."""
    from ltr_jax.engine import engine as m

    return lambda: [f._cache_size() for f in m.JITTED]


@pytest.fixture(scope="session")
def warm_engine_for():
    """A callable that warms an engine for these prompts and output lengths (every prefill bucket they or their
    recomputed resumes use, every cache length, every transition) and returns the cache lengths it warmed."""

    def warm(engine, prompts, outputs):
        longest = max(len(p) + o for p, o in zip(prompts, outputs))
        buckets = {engine.config.prefill_bucket(len(p) + k) for p, o in zip(prompts, outputs) for k in (0, o)}
        cache_lens = engine.cache_buckets(longest + 1)
        engine.warmup(prefill_buckets=sorted(buckets), cache_lens=cache_lens, transitions=True)
        return cache_lens

    return warm


@contextlib.contextmanager
def lowerings():
    """Collect the computations JAX lowers for compilation while the block runs (one per new compiled shape; a
    shape already compiled lowers none)."""
    import jax

    events: list[str] = []

    def listen(event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            events.append(event)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05):
    """Poll ``predicate`` until it returns something truthy or ``timeout`` passes; returns its last value (tests
    wait on events this way, never on a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)
