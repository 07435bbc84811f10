"""Benchmark commands end to end on small inputs: every policy in one invocation, JSON + Markdown + plots."""

from __future__ import annotations

import json

import pytest

from ltr_jax.bench import policy_bench, simulate


def test_policy_benchmark_runs_every_policy_on_one_trace(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "x " * (i + 1), "reference": "y " * (3 + 2 * i)})
                               + "\n" for i in range(10)))
    report = policy_bench.main(["--model", "tiny", "--prompts", str(prompts), "--split", "all", "--n", "10",
                                "--policies", "fcfs,oracle-sjf,oracle-srtf", "--rates", "50", "--slots", "2",
                                "--max-output-tokens", "24", "--out", str(tmp_path / "out"), "--no-progress"])
    run = report["runs"]["rate=50"]
    assert set(run) == {"fcfs", "oracle-sjf", "oracle-srtf"}
    for metrics in run.values():
        assert metrics["completed"] == 10 and metrics["incomplete_or_wrong_length"] == 0
        assert metrics["latency_s"]["p99"] >= metrics["latency_s"]["p50"] > 0
        assert metrics["max_waiting_time_s"]["max"] >= metrics["ttft_s"]["max"] - 1e-9
    assert {"report.json", "report.md", "latency_vs_rate.png", "latency_cdf.png"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    assert "| oracle-sjf |" in (tmp_path / "out" / "report.md").read_text()


def test_simulate_command_reports_ratios_against_fcfs(tmp_path):
    report = simulate.main(["--n", "400", "--rates", "64", "--slots", "16", "--tau", "0.6",
                            "--policies", "fcfs,ltr,oracle-sjf", "--out", str(tmp_path)])
    ratios = report["ratios"]["rate=64"]
    assert ratios["fcfs/oracle-sjf"] > 1.0 and ratios["fcfs/ltr"] > 1.0
    assert json.loads((tmp_path / "report.json").read_text())["ranker_tau"] == 0.6


@pytest.mark.parametrize("module", [policy_bench, simulate])
def test_help_documents_every_option(module, capsys):
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    for option in ("--policies", "--rates", "--out", "--seed"):
        assert option in text
