"""`python -m ltr_jax.generate --prompt "..."`: one chat answer from a model, through the serving engine.

Owns the smallest end-to-end path: load a model (the embedded default SmolLM2 unless `--model` names a .gguf file or
a Hugging Face checkpoint directory; downloaded on first use), apply its chat template, prefill and decode with
the engine, and stream the answer to stdout. Greedy by default.
"""

from __future__ import annotations

import argparse
import sys

from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.models.llama import Llama
from ltr_jax.models.loading import load_model


def generate_text(loaded, prompt: str, max_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
                  raw: bool = False, stream=None) -> str:
    """Answer one prompt with a one-slot engine; write text pieces to `stream` as they are produced."""
    tok = loaded.tokenizer
    text = prompt if raw else tok.apply_chat_template([{"role": "user", "content": prompt}])
    ids = tok.encode(text)
    max_seq_len = 1 << (len(ids) + max_tokens + 1).bit_length()
    engine = Engine(Llama.from_params(loaded.config, loaded.params), EngineConfig(num_slots=1, max_seq_len=max_seq_len))
    prefix = engine.prefill(ids, SlotSampling(temperature=temperature, seed=seed))
    engine.insert(prefix, 0)
    decoder = tok.incremental_decoder()
    pieces = []
    token = int(prefix.token)
    for i in range(max_tokens):
        if token in tok.stop_token_ids:
            break
        piece = decoder.push(token)
        pieces.append(piece)
        if stream is not None and piece:
            stream.write(piece)
            stream.flush()
        if i + 1 < max_tokens:
            token = int(engine.generate()[0])
    tail = decoder.finish()
    if stream is not None and tail:
        stream.write(tail)
    return "".join(pieces) + tail


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--model", default=None, help="a .gguf file or HF checkpoint dir (default: embedded SmolLM2)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")
    args = p.parse_args(argv)
    if args.max_tokens < 1:
        p.error("--max-tokens must be >= 1")
    loaded = load_model(args.model)
    generate_text(loaded, args.prompt, args.max_tokens, args.temperature, args.seed, args.raw, stream=sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
