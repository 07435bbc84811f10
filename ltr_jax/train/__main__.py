"""Command line: ``python -m ltr_jax.train --config configs/ranker_<name>.yaml [--set KEY=VALUE ...]``.

Splits the data, computes (or reuses) backbone features, trains every configured method, evaluates each on the
held-out split and exports the configured head; prints the report as JSON on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from ltr_jax.machine import machine_info
from ltr_jax.train.trainer import ConfigError, TrainConfig, run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltr_jax.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML training config (see configs/ranker_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key, e.g. --set epochs=10 --set optimizer.lr=0.003 (repeatable)")
    parser.add_argument("--labels", help="shorthand for --set labels=PATH (JSONL from the labeling job)")
    parser.add_argument("--export-path", help="export the chosen head here (the config's export_method, or "
                        "listmle when the config exports nothing)")
    parser.add_argument("--no-export", action="store_true", help="train and evaluate only (export_method=null)")
    parser.add_argument("--no-progress", action="store_true", help="hide the feature progress bar")
    args = parser.parse_args(argv)
    overrides = list(args.overrides)
    if args.labels:
        overrides.append(f"labels={json.dumps(args.labels)}")  # JSON is YAML: the path stays a string
    try:
        cfg = TrainConfig.from_yaml(args.config, overrides)
        if args.export_path:
            overrides.append(f"export_path={json.dumps(args.export_path)}")
            if cfg.export_method is None:
                overrides.append("export_method=" + ("listmle" if "listmle" in cfg.methods else cfg.methods[0]))
        if args.no_export:
            overrides.append("export_method=null")
        cfg = TrainConfig.from_yaml(args.config, overrides)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    report = run_training(cfg, progress=not args.no_progress)
    report["command"] = "python -m ltr_jax.train " + " ".join(sys.argv[1:] if argv is None else argv)
    report["date"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["machine"] = machine_info()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
