"""`python -m ltr_jax.bench <command>`: the benchmark command line.

Commands: `engine` (decode step time vs matmul roofline), `run` (every policy on one trace against the real
engine, in-process or through the HTTP server), `simulate` (the same report from the discrete-event simulator at
paper scale), `combine` (pool runs of one experiment on several seeds), `resimulate` (replay real runs' exact
traces in the simulator: what ranking errors cost and what the ranker's pass adds), `project` (a real run's
engine simulated at other workload sizes and loads, over many seeds: what an experiment can expect), `online` (the
ranker learning from live traffic on a replayed stream, against the static ranker and fcfs), `server` (the serving
process: start-up time, resident memory, and hostile clients).
"""

from __future__ import annotations

import sys

COMMANDS = {
    "engine": "ltr_jax.bench.engine_bench",
    "run": "ltr_jax.bench.policy_bench",
    "simulate": "ltr_jax.bench.simulate",
    "combine": "ltr_jax.bench.combine",
    "resimulate": "ltr_jax.bench.resimulate",
    "project": "ltr_jax.bench.project",
    "online": "ltr_jax.bench.online_bench",
    "server": "ltr_jax.bench.server_bench",
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip())
        print("\nusage: python -m ltr_jax.bench {" + ",".join(COMMANDS) + "} [--help]")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    import importlib

    importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    main()
