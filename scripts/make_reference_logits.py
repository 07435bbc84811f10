"""Produce the reference-logit fixtures with Hugging Face transformers (an implementation independent of ours).

Run it in a SEPARATE virtual environment; torch and transformers are never dependencies of ltr_jax:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 transformers accelerate gguf numpy  # CPU torch wheel
    /tmp/refvenv/bin/python scripts/make_reference_logits.py --gguf ~/.cache/ltr_jax/SmolLM2-135M-Instruct.Q4_1.gguf

It writes two fixtures under tests/fixtures/:

1. `smollm2_reference_logits.npz` - SmolLM2-135M-Instruct loaded from the GGUF by transformers' own GGUF loader
   (its own tokenizer conversion, its own Q/K un-permutation; gguf's numpy dequantizer, float32, CPU): the
   chat-templated prompt's token ids, the logits of the last few prompt positions restricted to their top-64
   entries, the full-vocab argmax at every position, the greedy continuation, and token ids of a few varied texts.
2. `tiny_llama3_hf/` + `tiny_llama3_reference_logits.npz` - a tiny random Llama (GQA, untied head, llama3 rope
   scaling) built and saved by transformers itself in bf16, sharded, with its logits on a fixed token sequence.
   This checks our safetensors/index/config.json reader and the llama3 rope against transformers.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
PROMPT = "What is the capital of France?"
N_LAST = 4  # positions whose logits are stored
TOP_K = 64  # vocab entries stored per position
N_GREEDY = 12
TOKENIZER_TEXTS = [
    "Hello, world! 1234567 tokens.",
    "  leading spaces\n\nand\ttabs\r\nwindows newlines  ",
    "naïve café — 日本語のテキスト, emoji 😀👍🏽, Ελληνικά",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "<|im_start|>user\nHi<|im_end|>\n",
    "I'm sure they'll've done it; don't you think? x=3.14e-10",
]


def versions() -> str:
    from importlib.metadata import version

    return json.dumps({"torch": torch.__version__, "transformers": transformers.__version__,
                       "gguf": version("gguf"), "numpy": np.__version__})


def smollm2_fixture(gguf_path: Path) -> None:
    directory, name = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    model.eval()
    messages = [{"role": "user", "content": PROMPT}]
    prompt_text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()  # [T, V]
        generated = model.generate(torch.tensor([ids]), max_new_tokens=N_GREEDY, do_sample=False,
                                   attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    continuation = generated[0, len(ids):].numpy()
    last = logits[-N_LAST:]
    top_idx = np.argsort(-last, axis=-1)[:, :TOP_K]
    top_val = np.take_along_axis(last, top_idx, axis=-1)
    text_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in TOKENIZER_TEXTS]
    out = FIXTURES / "smollm2_reference_logits.npz"
    np.savez_compressed(
        out, prompt=np.array(PROMPT), prompt_text=np.array(prompt_text), token_ids=np.array(ids, np.int32),
        last_positions=np.arange(len(ids) - N_LAST, len(ids), dtype=np.int32),
        top_indices=top_idx.astype(np.int32), top_logits=top_val.astype(np.float32),
        argmax=logits.argmax(-1).astype(np.int32), logit_std=np.float32(last.std()),
        greedy_ids=continuation.astype(np.int32),
        greedy_text=np.array(tok.decode(continuation, skip_special_tokens=True)),
        tokenizer_texts=np.array(TOKENIZER_TEXTS),
        tokenizer_ids=np.array(json.dumps(text_ids)), gguf_file=np.array(name), versions=np.array(versions()),
    )
    print(f"wrote {out} ({out.stat().st_size} bytes); prompt {len(ids)} tokens; greedy: "
          f"{tok.decode(continuation, skip_special_tokens=True)!r}")


def tiny_llama3_fixture() -> None:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256, tie_word_embeddings=False,
        rope_theta=10000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32},
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-default weights so the logits are not all near zero
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model = model.to(torch.bfloat16)
    directory = FIXTURES / "tiny_llama3_hf"
    shutil.rmtree(directory, ignore_errors=True)
    model.save_pretrained(directory, max_shard_size="60KB")
    # the reference logits come from the bf16 weights as saved, computed in float32
    reloaded = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokens = torch.tensor([[int(t) for t in np.random.default_rng(0).integers(0, 96, size=48)]])
    with torch.no_grad():
        logits = reloaded(tokens).logits[0].numpy()
    out = FIXTURES / "tiny_llama3_reference_logits.npz"
    np.savez_compressed(out, tokens=tokens[0].numpy().astype(np.int32), logits=logits.astype(np.float32),
                        versions=np.array(versions()))
    files = sorted(p.name for p in directory.iterdir())
    print(f"wrote {directory} {files} and {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, required=True, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    smollm2_fixture(args.gguf.expanduser().resolve())
    tiny_llama3_fixture()


if __name__ == "__main__":
    main()
