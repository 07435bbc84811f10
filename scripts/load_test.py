"""Load test a running ltr-jax (or any OpenAI-compatible) server with many concurrent streaming clients.

    python -m ltr_jax.serve &                                   # SmolLM2, http://127.0.0.1:8000
    python scripts/load_test.py --url http://127.0.0.1:8000 --clients 200 --max-tokens 64
    python scripts/load_test.py --disconnect-fraction 0.2       # 20% of clients hang up mid-stream

Prints a JSON summary (accepted / 429 / completed exactly once with every token / disconnected, latency
percentiles, throughput, and the server's queue and running slots afterwards). Exit status 0 when every
accepted stream that was not dropped on purpose completed exactly once with max_tokens tokens and no request was
left queued or running; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ltr_jax.server.loadgen import load_test_ok, run_load_test


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--disconnect-fraction", type=float, default=0.0, help="share of clients that hang up early")
    p.add_argument("--disconnect-after-chunks", type=int, default=2)
    p.add_argument("--model", default=None, help="model id (default: the first one /v1/models lists)")
    p.add_argument("--api-key", default=os.environ.get("LTR_JAX_API_KEY"))
    p.add_argument("--timeout", type=float, default=600.0, help="seconds for the whole test")
    p.add_argument("--details", action="store_true", help="include every client's result")
    args = p.parse_args()
    if args.clients < 1 or not 0 <= args.disconnect_fraction < 1 or args.max_tokens < 1:
        p.error("--clients and --max-tokens must be >= 1 and --disconnect-fraction in [0, 1)")
    summary = run_load_test(args.url, clients=args.clients, max_tokens=args.max_tokens,
                            disconnect_fraction=args.disconnect_fraction,
                            disconnect_after_chunks=args.disconnect_after_chunks, model=args.model,
                            api_key=args.api_key, timeout_s=args.timeout)
    if not args.details:
        summary.pop("clients_detail")
    summary["ok"] = load_test_ok(summary)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
