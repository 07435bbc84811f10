"""Each config key has one default: the built-in tree, `serve --print-config` without a config file (from any working
directory), the shipped default YAML, every command line's effective defaults and the runtime classes' keyword
defaults all agree."""

import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ltr_jax.bench import policy_bench, simulate
from ltr_jax.bench.options import SHARED_SHORTHANDS, lookup
from ltr_jax.config import EngineRunConfig, ServeConfig, config_to_dict, load_config
from ltr_jax.config_schema import build_config
from ltr_jax.engine.engine import EngineConfig
from ltr_jax.engine.orchestrator import Orchestrator
from ltr_jax.engine.ranking import LearnedRanking, make_ranking_stage
from ltr_jax.scheduler.scheduler import StarvationConfig
from ltr_jax.train.trainer import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


def keyword_default(fn, name):
    return inspect.signature(fn).parameters[name].default


def test_the_default_yaml_is_the_built_in_tree():
    assert load_config(ROOT / "configs" / "serve_smollm2.yaml") == load_config(None) == ServeConfig()


def test_print_config_without_a_config_file_is_the_built_in_tree(tmp_path):
    """Run from a directory with no configs/ folder: the package's defaults do not depend on the working directory."""
    out = subprocess.run([sys.executable, "-m", "ltr_jax.serve", "--print-config"], cwd=tmp_path, check=True,
                         capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert yaml.safe_load(out.stdout) == config_to_dict(ServeConfig())


def test_the_engine_sections_are_shared_by_serve_and_the_other_commands():
    serve, run = ServeConfig(), EngineRunConfig()
    for f in dataclasses.fields(EngineRunConfig):
        assert getattr(serve, f.name) == getattr(run, f.name), f.name


@pytest.mark.parametrize("module, shorthands", [(policy_bench, policy_bench.RUN_SHORTHANDS),
                                                (simulate, SHARED_SHORTHANDS)])
def test_bench_shorthands_default_to_the_tree(module, shorthands):
    args = module.parse_args([])
    tree = EngineRunConfig()
    for sh in shorthands:
        assert getattr(args, sh.dest) == lookup(tree, sh.key), sh.key
    assert args.config_tree == tree


def test_bench_run_fuse_flag_sets_the_config_key():
    args = policy_bench.parse_args(["--fuse-ranker-pass", "--max-seq-len", "1024", "--score-per-boundary", "0"])
    assert args.config_tree.ranker.fuse_max_len == 1024 and args.fuse_ranker_pass
    assert args.config_tree.ranker.score_per_boundary is None and args.score_per_boundary is None
    assert not policy_bench.parse_args([]).fuse_ranker_pass  # the tree's default: no fused pass


def test_label_reads_the_same_tree(tmp_path, capsys):
    from ltr_jax.train.label import main as label_main

    with pytest.raises(SystemExit):  # a bad key is named before any model loads
        label_main(["--set", "engine.num_slots=0", "--out", str(tmp_path / "x.jsonl")])
    assert "engine.num_slots = 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a context given explicitly must fit --max-tokens, checked before loading
        label_main(["--set", "engine.max_seq_len=64", "--max-tokens", "100", "--out", str(tmp_path / "x.jsonl")])
    assert "engine.max_seq_len = 64" in capsys.readouterr().err


def test_train_cli_defaults_are_the_train_config():
    assert TrainConfig.from_yaml(None, ["export_method=null"]) == build_config(TrainConfig, {"export_method": None})
    assert TrainConfig(export_method=None).optimizer == build_config(TrainConfig, {"export_method": None}).optimizer


def test_runtime_keyword_defaults_are_the_tree():
    tree = ServeConfig()
    assert tree.engine.to_engine_config() == EngineConfig()
    assert tree.scheduler.starvation == StarvationConfig()
    assert keyword_default(Orchestrator, "preempt_mode") == tree.engine.preempt_mode
    assert keyword_default(Orchestrator, "swap_budget_mb") == tree.engine.swap_budget_mb
    assert keyword_default(Orchestrator, "score_per_boundary") == tree.ranker.score_per_boundary
    assert keyword_default(Orchestrator, "max_queue") == tree.server.max_queue
    for fn in (make_ranking_stage, LearnedRanking):
        assert keyword_default(fn, "reuse_pass") == tree.ranker.reuse_pass
        assert keyword_default(fn, "state_budget_mb") == tree.ranker.state_budget_mb
        assert keyword_default(fn, "fuse_pass") == (tree.ranker.fuse_max_len > 0)
