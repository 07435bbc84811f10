"""Our GGUF loader + forward pass against Hugging Face transformers on the real SmolLM2-135M-Instruct.

The fixture (tests/fixtures/smollm2_reference_logits.npz, made by scripts/make_reference_logits.py in a separate
torch venv) holds what transformers computes from the same GGUF file with its own GGUF loader: its own tokenizer
conversion, its own Q/K un-permutation and its own PyTorch forward pass, in float32 on CPU. Only the numpy
dequantizer (gguf.quants) is shared, so a wrong permutation, rope, norm or orientation shows up here.

Tolerance: 1e-3 absolute on logits whose largest magnitude is ~37 and std ~6.7 (2.7e-5 of the scale). Both sides
run float32 on identical weights; only summation order differs (measured max difference 5.4e-5), while any real
bug moves logits by >= 1e-1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ltr_jax.models.llama import reference_forward

FIXTURES = Path(__file__).resolve().parent / "fixtures"

pytestmark = pytest.mark.integration
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def reference():
    return np.load(FIXTURES / "smollm2_reference_logits.npz")


def test_prompt_tokens_match_transformers(smollm2_model, reference):
    tok = smollm2_model.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": str(reference["prompt"])}])
    assert tok.encode(text) == reference["token_ids"].tolist()


def test_logits_and_greedy_continuation_match_transformers(smollm2_model, reference):
    cfg, params, tok = smollm2_model.config, smollm2_model.params, smollm2_model.tokenizer
    prompt, greedy = reference["token_ids"], reference["greedy_ids"]
    # one teacher-forced pass over prompt + transformers' greedy continuation: our argmax at every continuation
    # position must reproduce that continuation, i.e. our own greedy decoding yields the same tokens
    seq = np.concatenate([prompt, greedy])[None].astype(np.int32)
    logits = np.asarray(reference_forward(cfg, params, seq))[0]

    last = logits[reference["last_positions"]]
    ours = np.take_along_axis(last, reference["top_indices"], axis=-1)
    diff = np.abs(ours - reference["top_logits"]).max()
    assert diff < TOLERANCE, f"max |logit diff| {diff:.2e} over the top-64 entries of the last 4 prompt positions"
    np.testing.assert_array_equal(logits[: len(prompt)].argmax(-1), reference["argmax"])

    n = len(prompt)
    predicted = logits[n - 1: n - 1 + len(greedy)].argmax(-1)
    np.testing.assert_array_equal(predicted, greedy)
    answer = tok.decode(predicted.tolist())
    assert answer == str(reference["greedy_text"])
    assert "Paris" in answer
