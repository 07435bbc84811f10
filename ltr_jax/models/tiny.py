"""A tiny random Llama with a byte-level tokenizer and a ChatML template, for tests and offline smoke runs.

Owns `tiny_model()`: a real `LoadedModel` (config, params, ChatTokenizer) small enough to compile in seconds on a
CPU, so the engine, server and benchmarks can be exercised end to end without the 93 MB default model.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from ltr_jax.models.config import LoadedModel, tiny_config
from ltr_jax.models.llama import init_random_params
from ltr_jax.models.tokenizer import ChatTokenizer

CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer() -> ChatTokenizer:
    """256 byte tokens (GPT-2 byte alphabet, no merges) + 3 special tokens: vocabulary of 259."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return ChatTokenizer(tok, chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>", source="byte-level test")


def tiny_model(seed: int = 0, **config_overrides) -> LoadedModel:
    """A random 2-layer GQA model (vocab 260) with the byte-level tokenizer."""
    overrides = {"vocab_size": 260, "max_position_embeddings": 4096}
    overrides.update(config_overrides)
    config = tiny_config(**overrides)
    return LoadedModel(config=config, params=init_random_params(config, seed), tokenizer=byte_level_tokenizer(),
                       source=f"tiny-random(seed={seed})")
