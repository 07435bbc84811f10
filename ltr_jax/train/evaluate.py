"""`python -m ltr_jax.train.evaluate`: scores an exported ranker on a prompt file.

Lengths come from the reference answers, from a named recorded answer (``--lengths outputs.llama3-8b``: its token
count under the serving model's tokenizer) or from a label file. It prints one table of the metrics of
`ltr_jax.train.metrics` (``--json``: and a JSON object as the last line). The source prior is fitted on the
ranker's training split when its training data can be found (the export records its config), else cross-fitted on
the file itself (each fold's prior from the other folds).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ltr_jax.train.metrics import PRIOR_FOLDS, cross_fitted_source_prior, evaluation, source_prior


def _training_prior(meta: dict[str, Any], tokenizer, sources: Sequence[str]) -> tuple[np.ndarray, str] | None:
    """The source prior fitted on the ranker's own training split, when its export names data found here."""
    from ltr_jax.config_schema import ConfigError
    from ltr_jax.train import data as train_data
    from ltr_jax.train.trainer import PROJECT_ROOT, TrainConfig, prepare_data

    raw = meta.get("train_config")
    if not isinstance(raw, dict):
        return None
    try:
        cfg = TrainConfig.from_dict({**raw, "extra_lengths": []}, base_dir=PROJECT_ROOT)
        data, label_source, _ = prepare_data(cfg, tokenizer)
    except (ConfigError, train_data.DataError, OSError):
        return None
    train_ids, _ = train_data.split_ids(data.ids, cfg.val_fraction, cfg.split_salt)
    train = data.subset(train_ids)
    return (source_prior(train.sources, train.lengths, sources),
            f"fitted on the ranker's {len(train)} training prompts ({label_source})")


def _fmt(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def print_table(result: dict[str, Any], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    table.add_column("value", justify="right")
    lo, hi = result["ci95"]
    table.add_row("Kendall tau-b", f"{_fmt(result['tau_b'])}  [{_fmt(lo)}, {_fmt(hi)}] 95% CI")
    table.add_row("pair accuracy", _fmt(result["pair_accuracy"]))
    table.add_row("prompts", str(result["n"]))
    table.add_row("baseline: source prior", _fmt(result["baselines"]["source_prior"]))
    table.add_row("baseline: prompt length", _fmt(result["baselines"]["prompt_length"]))
    for src, tau in result["per_source"].items():
        table.add_row(f"tau-b within {src} ({result['source_counts'][src]})", _fmt(tau))
    Console(width=120).print(table)
    print(f"source prior: {result['source_prior_fit']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from ltr_jax.train.data import LENGTH_FIELDS_HELP

    p = argparse.ArgumentParser(prog="python -m ltr_jax.train.evaluate",
                                description="Score an exported length ranker on a prompt file: Kendall tau-b with "
                                            "a bootstrap 95%% CI, pair accuracy, tau-b per source and baselines.")
    p.add_argument("--ranker", default=None, help="exported ranker directory (default: the packaged default ranker)")
    p.add_argument("--prompts", required=True, help="prompt file (prompts.jsonl format, ShareGPT JSON/JSONL, "
                                                    "'shared' or tfds:NAME)")
    p.add_argument("--lengths", default="reference", help="where each prompt's output length comes from: "
                                                          + LENGTH_FIELDS_HELP + " (default: reference)")
    p.add_argument("--held-out", action="store_true", help="score only the prompts the ranker held out of its "
                   "training (the val_fraction and split salt its export records): its honest number on the file it "
                   "was trained from")
    p.add_argument("--model", default=None, help="backbone source (default: the model the ranker was trained on)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the CI (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling (default 0)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON object, the last line")
    args = p.parse_args(argv)
    if args.bootstrap < 10:
        p.error(f"--bootstrap must be >= 10 resamples, got {args.bootstrap}")
    return args


def evaluate_ranker(args: argparse.Namespace) -> dict[str, Any]:
    from ltr_jax.models.loading import load_model
    from ltr_jax.models.ranker_checkpoint import default_ranker_path, load_scorer, read_spec
    from ltr_jax.train import data as train_data

    ranker = Path(args.ranker) if args.ranker else default_ranker_path()
    spec, meta = read_spec(ranker)
    model = load_model(args.model if args.model else spec.model_source)
    tok = model.tokenizer
    examples = train_data.load_examples(args.prompts)
    if not examples:
        raise train_data.DataError(f"{args.prompts}: no prompts in it")
    if args.held_out:
        trained = meta.get("train_config") or {}
        if "val_fraction" not in trained:
            raise train_data.DataError(f"--held-out: {ranker} does not record its training split (no "
                                       "train_config.val_fraction in its export); evaluate on a file it never saw")
        salt = str(trained.get("split_salt", train_data.DEFAULT_SPLIT_SALT))
        examples = [e for e in examples if train_data.is_validation(e.id, float(trained["val_fraction"]), salt)]
        if not examples:
            raise train_data.DataError(f"{args.prompts}: none of its prompts is in {ranker}'s held-out split")
    # a label file labels a sample of the prompts: score that sample; an answer field must be on every record
    label_file = train_data.check_length_field(args.lengths) is not None
    lengths = train_data.answer_lengths(examples, args.lengths, tok, str(args.prompts), every=not label_file)
    data = train_data.build_ranking_data(examples, lengths, tok, spec.max_prompt_len)
    if len(data) < 2:
        raise train_data.DataError(f"{args.prompts}: {len(data)} labelled prompt; a ranking needs at least two")
    scores = load_scorer(ranker, model).score(data.tokens)
    fitted = _training_prior(meta, tok, data.sources)
    if fitted is None:
        prior = cross_fitted_source_prior(data.ids, data.sources, data.lengths)
        fit_note = f"cross-fitted on this file ({PRIOR_FOLDS} folds by id hash): the ranker's training data is not here"
    else:
        prior, fit_note = fitted
    result = evaluation(scores, data.lengths, data.sources, [len(t) for t in data.tokens], prior,
                        n_resamples=args.bootstrap, seed=args.seed)
    counts = {s: data.sources.count(s) for s in result["per_source"]}
    return {**result, "source_counts": counts, "source_prior_fit": fit_note, "ranker": str(ranker),
            "prompts": str(args.prompts), "lengths": args.lengths, "held_out_only": bool(args.held_out)}


def main(argv: list[str] | None = None) -> int:
    from ltr_jax.models.ranker_checkpoint import RankerCheckpointError
    from ltr_jax.train.data import DataError

    args = parse_args(argv)
    try:
        result = evaluate_ranker(args)
    except (DataError, RankerCheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_table(result, f"{result['ranker']} on {result['prompts']} (lengths: {result['lengths']})")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
