"""bfloat16 against float32 on the same model: greedy agreement and the largest logit difference.

    python scripts/dtype_agreement.py --out benchmarks/results/bf16_vs_f32_smollm2.json
    python scripts/dtype_agreement.py --candidate bfloat16-weights  # float32 activations, bfloat16 weights

The candidate is ``bfloat16`` (weights, activations and KV cache: `model.dtype`) or ``bfloat16-weights``
(`model.weight_dtype`: bfloat16 weights, float32 activations and cache, what a CPU engine of several slots picks).

Serves ``--n`` chat prompts (from ``../shared/data/prompts.jsonl``, taking each source in turn) greedily for
``--tokens`` tokens with the engine in each dtype, and reports the share of prompts whose continuations are
identical, where the others first differ, and the largest |logit difference| (and the share of equal argmaxes)
when both models read the float32 continuation (teacher forcing: the same inputs at every position).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ltr_jax.engine.engine import Engine, EngineConfig, SlotSampling
from ltr_jax.machine import machine_info
from ltr_jax.models.llama import Llama
from ltr_jax.models.loading import load_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "prompts.jsonl"


def pick_prompts(path: Path, n: int, tok, max_tokens: int) -> list[tuple[str, list[int]]]:
    """(id, chat-templated token ids) of ``n`` prompts of at most ``max_tokens`` tokens, taken from each source in
    turn (in file order)."""
    if not path.is_file():
        raise SystemExit(f"{path} is missing: this script reads the shared prompts beside the checkout (../shared)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    queues = {s: [r for r in rows if r["source"] == s] for s in sorted({r["source"] for r in rows})}
    picked: list[tuple[str, list[int]]] = []
    while len(picked) < n and any(queues.values()):
        for queue in queues.values():
            while queue and len(picked) < n:
                r = queue.pop(0)
                ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                                         add_generation_prompt=True))
                if len(ids) <= max_tokens:
                    picked.append((r["id"], ids))
                    break
    return picked


def greedy(model: Llama, prompts: list[list[int]], tokens: int, max_seq_len: int) -> list[list[int]]:
    engine = Engine(model, EngineConfig(num_slots=len(prompts), max_seq_len=max_seq_len, prefill_batch=1))
    out = []
    for slot, prompt in enumerate(prompts):
        prefix = engine.prefill(prompt, SlotSampling())
        engine.insert(prefix, slot)
        out.append([int(prefix.token)])
    for _ in range(tokens - 1):
        step = np.asarray(engine.generate())
        for slot in range(len(prompts)):
            out[slot].append(int(step[slot]))
    return out


def forced_logits(model: Llama, prompts: list[list[int]], conts: list[list[int]]) -> np.ndarray:
    """Logits [N, tokens, V] (float32) predicting each continuation token from the prompt and the tokens before."""
    n_tok = len(conts[0])
    seqs = [p + c[:-1] for p, c in zip(prompts, conts)]
    width = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    lengths = np.asarray([len(s) for s in seqs], np.int32)
    starts = np.asarray([len(p) - 1 for p in prompts], np.int32)

    @jax.jit
    def run(tokens, lengths, starts):
        x, _ = model.hidden(tokens, lengths)
        idx = starts[:, None] + jnp.arange(n_tok)[None, :]
        return model.logits(jnp.take_along_axis(x, idx[..., None], axis=1))

    return np.asarray(run(tokens, lengths, starts), np.float32)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model source (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--n", type=int, default=20, help="prompts")
    p.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt")
    p.add_argument("--max-prompt-tokens", type=int, default=256, help="longer prompts are skipped")
    p.add_argument("--candidate", default="bfloat16", choices=("bfloat16", "bfloat16-weights"),
                   help="what runs against float32 (see above)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    base = load_model(args.model, dtype="float32")
    tok = base.tokenizer
    picked = pick_prompts(SHARED, args.n, tok, args.max_prompt_tokens)
    ids, prompts = [i for i, _ in picked], [p for _, p in picked]
    max_seq_len = 1 << (args.max_prompt_tokens + args.tokens + 1).bit_length()
    conts, logits = {}, {}
    candidate = (base.config.replace(dtype="bfloat16") if args.candidate == "bfloat16"
                 else base.config.replace(dtype="float32", weight_dtype="bfloat16"))
    for dtype, config in (("float32", base.config.replace(dtype="float32")), ("bfloat16", candidate)):
        model = Llama.from_params(config, base.params)
        conts[dtype] = greedy(model, prompts, args.tokens, max_seq_len)
        logits[dtype] = forced_logits(model, prompts, conts["float32"])
    same = [a == b for a, b in zip(conts["float32"], conts["bfloat16"])]
    first_diff = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
                  for a, b in zip(conts["float32"], conts["bfloat16"])]
    diff = np.abs(logits["float32"] - logits["bfloat16"])
    report = {
        "benchmark": "bf16 vs f32 greedy agreement", "candidate": args.candidate, "model": base.config.name,
        "prompts": len(prompts),
        "tokens": args.tokens, "backend": jax.default_backend(), "machine": machine_info(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "identical_continuations": int(sum(same)), "identical_share": round(sum(same) / len(same), 3),
        "first_difference_at": first_diff,
        "forced_max_abs_logit_diff": round(float(diff.max()), 4),
        "forced_mean_abs_logit_diff": round(float(diff.mean()), 5),
        "forced_f32_logit_range": round(float(np.ptp(logits["float32"])), 2),
        "forced_argmax_agreement": round(float((logits["float32"].argmax(-1) == logits["bfloat16"].argmax(-1))
                                               .mean()), 4),
        "prompt_ids": ids, "seconds": round(time.perf_counter() - t0, 1),
        "note": "forced_*: both dtypes read the float32 greedy continuation, so every position has the same input",
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
