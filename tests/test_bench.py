"""Benchmark commands end to end on small inputs: every policy in one invocation, JSON + Markdown + plots."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from ltr_jax.bench import http_replay, online_bench, policy_bench, project, resimulate, simulate


def _prompts_with_lognormal_answers(tmp_path, n: int, seed: int, sigma: float):
    """A prompts JSONL of ``n`` prompts of 5-79 words whose reference answers have lognormal word counts."""
    prompts = tmp_path / "prompts.jsonl"
    rng = np.random.default_rng(seed)
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": "w " * int(rng.integers(5, 80)),
                                           "reference": "w " * int(rng.lognormal(4, sigma))}) + "\n"
                               for i in range(n)))
    return prompts


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
        assert metrics["engine_shapes_compiled_in_run"] == 0  # warm-up compiled every shape the replay meets
        assert metrics["latency_s"]["p99"] >= metrics["latency_s"]["p50"] > 0
        assert metrics["max_waiting_time_s"]["max"] >= metrics["ttft_s"]["max"] - 1e-9
    assert {"report.json", "report.md", "latency_vs_rate.png", "latency_cdf.png"} <= {
        p.name for p in (tmp_path / "out").iterdir()}
    assert "| oracle-sjf |" in (tmp_path / "out" / "report.md").read_text()
    assert report["machine"]["backend"] == "cpu" and report["machine"]["cpu_count"] >= 1


def test_load_factors_set_rates_from_the_measured_capacity(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "x " * (i + 1), "reference": "y " * (3 + i)})
                               + "\n" for i in range(8)))
    report = policy_bench.main(["--model", "tiny", "--prompts", str(prompts), "--split", "all", "--n", "8",
                                "--policies", "fcfs", "--load-factors", "0.5,2", "--capacity-probe", "6",
                                "--slots", "2", "--max-output-tokens", "16", "--unloaded-probe", "0",
                                "--no-progress"])
    cap = report["capacity"]
    assert cap["requests"] == 6 and cap["req_s"] > 0 and cap["load_factors"] == [0.5, 2.0]
    assert list(report["rates"].values()) == [round(0.5 * cap["req_s"], 3), round(2 * cap["req_s"], 3)]
    assert all(run["fcfs"]["completed"] == 8 for run in report["runs"].values())
    with pytest.raises(SystemExit):
        policy_bench.parse_args(["--load-factors", "1.5,-1"])


def test_a_burst_of_short_requests_does_not_read_as_a_faster_engine():
    from ltr_jax.bench.workload import Item, workload_capacity

    items = [Item(f"q{i}", [1], n) for i, n in enumerate([10, 10, 50, 50, 50, 70])]  # mean 40
    assert workload_capacity(items[:2], items, completions_per_s=4.0) == pytest.approx(1.0)  # probe mean 10
    assert workload_capacity(items, items, completions_per_s=4.0) == pytest.approx(4.0)


def test_ltr_on_a_model_without_a_packaged_ranker_asks_for_one(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "q", "prompt": "x y", "reference": "y z"}) + "\n")
    with pytest.raises(SystemExit, match="need --ranker"):
        policy_bench.main(["--model", "tiny", "--prompts", str(prompts), "--split", "all", "--n", "1",
                           "--policies", "fcfs,ltr", "--rates", "5", "--no-progress"])


def test_simulate_command_reports_ratios_against_fcfs(tmp_path, capsys):
    prompts = _prompts_with_lognormal_answers(tmp_path, 50, seed=0, sigma=1)
    report = simulate.main(["--prompts", str(prompts), "--n", "400", "--rates", "64", "--slots", "8",
                            "--tau", "0.6", "--policies", "fcfs,ltr,oracle-sjf", "--out", str(tmp_path / "o")])
    run, ratios = report["runs"]["rate=64"], report["ratios"]["rate=64"]
    assert ratios["fcfs/oracle-sjf"] == pytest.approx(run["fcfs"]["latency_s"]["mean"]
                                                      / run["oracle-sjf"]["latency_s"]["mean"])
    assert ratios["fcfs/oracle-sjf"] > 1.0 and ratios["fcfs/ltr"] > 1.0
    assert all(r["num_finished"] == 400 for r in run.values())
    assert "whitespace words x 1.3" in report["length_source"]
    assert json.loads((tmp_path / "o" / "report.json").read_text())["ranker_tau"] == 0.6
    with pytest.raises(SystemExit):
        simulate.main(["--policies", "fcfs,lifo"])
    assert "lifo" in capsys.readouterr().err


def test_simulate_charges_the_rankers_pass_to_the_ranking_policies(tmp_path):
    prompts = _prompts_with_lognormal_answers(tmp_path, 50, seed=0, sigma=1)
    common = ["--prompts", str(prompts), "--n", "300", "--rates", "64", "--slots", "4", "--tau", "0.6",
              "--policies", "fcfs,ltr,oracle-sjf"]
    default = simulate.main(common)  # Llama-3-8B step model: the 16-block SmolLM2 ranker's small share by default
    assert default["ranker_cost"]["fraction_of_prefill"] == pytest.approx(simulate.RANKER_SHARE_OF_LLAMA3_8B)
    assert 0.005 < simulate.RANKER_SHARE_OF_LLAMA3_8B < 0.01
    free = simulate.main(common + ["--ranker-cost", "0"])
    costly = simulate.main(common + ["--ranker-cost", "0.5"])
    shared = simulate.main(common + ["--ranker-cost", "0.5", "--ranker-reuse"])
    mean = {name: {p: r["runs"]["rate=64"][p]["latency_s"]["mean"] for p in ("fcfs", "ltr", "oracle-sjf")}
            for name, r in (("free", free), ("costly", costly), ("shared", shared))}
    for policy in ("fcfs", "oracle-sjf"):  # they never rank: unaffected
        assert mean["free"][policy] == mean["costly"][policy] == mean["shared"][policy]
    assert mean["free"]["ltr"] < mean["shared"]["ltr"] < mean["costly"]["ltr"]
    ltr = costly["runs"]["rate=64"]["ltr"]
    assert ltr["ranker_seconds"] > 0 and 0 < ltr["ranker_share_of_busy_time"] < 1
    assert costly["runs"]["rate=64"]["fcfs"]["ranker_seconds"] == 0
    assert shared["runs"]["rate=64"]["ltr"]["reused_ranker_passes"] == 300
    with pytest.raises(SystemExit):
        simulate.main(common + ["--ranker-cost", "1.5"])


@pytest.mark.parametrize("module", [policy_bench, simulate, resimulate, project, online_bench])
def test_help_documents_every_option(module, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    expected = {resimulate: ("--out",), project: ("--n", "--load-factors", "--seeds", "--policies", "--out"),
                online_bench: ("--arms", "--length-scale", "--load", "--window-s", "--json", "--out")}.get(
        module, ("--policies", "--rates", "--out", "--seed", "--preempt-mode"))
    for option in expected:
        assert option in text
    parsers = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        module.parse_args([])
    undocumented = [a.option_strings for a in parsers[0]._actions if not a.help]
    assert undocumented == []


def test_starvation_cost_is_the_share_of_ltr_gain_kept():
    from ltr_jax.bench.report import markdown_table, starvation_cost

    def run(mean, max_wait):
        return {"latency_s": {"mean": mean}, "max_waiting_time_s": {"max": max_wait}}

    per_policy = {"fcfs": run(40.0, 30.0), "ltr": run(10.0, 200.0), "ltr+starvation": run(13.0, 101.0)}
    cost = starvation_cost(per_policy, {"threshold_s": 100.0, "quantum_s": 2.0})
    assert cost["share_of_ltr_gain_kept"] == pytest.approx(0.9)  # (40 - 13) / (40 - 10)
    assert cost["max_waiting_time_max_s"] == 101.0 and cost["ltr_max_waiting_time_max_s"] == 200.0
    assert starvation_cost({"fcfs": run(1, 1), "ltr": run(1, 1)}, {"threshold_s": 1, "quantum_s": 1}) is None
    assert starvation_cost({**per_policy, "ltr": run(50.0, 1.0)}, {"threshold_s": 1, "quantum_s": 1}) is None
    assert starvation_cost({**per_policy, "ltr": run(39.0, 1.0)}, {"threshold_s": 1, "quantum_s": 1}) is None
    for r in per_policy.values():  # the table needs the other columns too
        r.update({k: {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": r["max_waiting_time_s"]["max"]}
                  for k in ("normalized_latency_s_per_token", "ttft_s", "tpot_s")})
        r["latency_s"].update(p50=0.0, p90=0.0, p99=0.0)
        r["max_waiting_time_s"].update(p99=0.0)
        r.update(throughput_req_s=1.0, throughput_tok_s=1.0, preemptions=0, promotions=0, completed=1)
    table = markdown_table({"runs": {"rate=1": per_policy}, "rates": {"rate=1": 1.0},
                            "starvation": {"threshold_s": 100.0, "quantum_s": 2.0}})
    assert "ltr+starvation keeps 90.0% of ltr's mean-latency gain over fcfs (loses 10.0%)" in table


def test_starvation_threshold_can_be_fcfs_worst_wait(tmp_path):
    prompts = _prompts_with_lognormal_answers(tmp_path, 60, seed=1, sigma=1.2)
    report = simulate.main(["--prompts", str(prompts), "--n", "300", "--rates", "64", "--slots", "4", "--tau", "0.6",
                            "--policies", "fcfs,ltr,ltr+starvation", "--starvation-threshold", "fcfs"])
    run = report["runs"]["rate=64"]
    fcfs_worst = run["fcfs"]["max_waiting_time_s"]["max"]
    assert run["ltr+starvation"]["starvation_threshold_s"] == pytest.approx(fcfs_worst, abs=0.1)
    assert run["ltr"]["max_waiting_time_s"]["max"] > fcfs_worst  # plain ltr starves its longest requests ...
    cost = report["starvation_cost"]["rate=64"]  # ... and starvation control is judged against that threshold
    assert cost["threshold_s"] == run["ltr+starvation"]["starvation_threshold_s"]
    for bad in (["--policies", "ltr+starvation,fcfs", "--starvation-threshold", "fcfs"],
                ["--starvation-threshold", "soon"], ["--starvation-threshold", "-3"]):
        with pytest.raises(SystemExit):
            simulate.main(bad)


def test_simulate_judges_the_default_fcfs_slack_rule_against_fcfs_worst_wait(tmp_path):
    prompts = _prompts_with_lognormal_answers(tmp_path, 60, seed=1, sigma=1.2)
    report = simulate.main(["--prompts", str(prompts), "--n", "300", "--rates", "64", "--slots", "4", "--tau", "0.6",
                            "--policies", "fcfs,ltr,ltr+starvation", "--starvation-slack", "2",
                            "--starvation-slack-share", "0.1"])
    assert report["starvation"]["rule"] == "fcfs-slack" and report["starvation"]["slack_s"] == 2.0
    assert report["starvation"]["slack_share"] == 0.1
    run = report["runs"]["rate=64"]
    assert "starvation_threshold_s" not in run["ltr+starvation"]
    cost = report["starvation_cost"]["rate=64"]
    assert cost["rule"] == "fcfs-slack"
    fcfs_worst = run["fcfs"]["max_waiting_time_s"]["max"]
    assert fcfs_worst > 20  # so the slack is the share of it, not slack_s
    assert cost["bound_s"] == pytest.approx(fcfs_worst + 0.1 * fcfs_worst)
    assert cost["promotions_per_request"] == pytest.approx(run["ltr+starvation"]["promotions"] / 300)
    # a threshold given on the command line asks for the threshold rule
    args = simulate.parse_args(["--starvation-threshold", "30"])
    assert args.config_tree.scheduler.starvation.rule == "threshold" and args.starvation_threshold == 30.0


def test_simulate_defaults_to_the_packaged_rankers_measured_tau():
    from ltr_jax.models.ranker_checkpoint import default_ranker_path, read_spec

    _, meta = read_spec(default_ranker_path())
    tau, source = simulate.default_tau()
    assert "packaged ranker" in source and tau == pytest.approx(meta.get("cv_kendall_tau_b")
                                                                or meta["val_kendall_tau_b"])


def _simulated_run(tmp_path, prompts, seed, *extra):
    out = tmp_path / f"seed{seed}"
    simulate.main(["--prompts", str(prompts), "--n", "300", "--rates", "32,64", "--slots", "4", "--tau", "0.6",
                   "--policies", "fcfs,ltr,ltr+starvation,oracle-sjf", "--starvation-threshold", "fcfs",
                   "--seed", str(seed), "--out", str(out), *extra])
    return out


def test_combine_pools_seeds_into_one_mean_per_policy(tmp_path, capsys):
    from ltr_jax.bench import combine

    prompts = _prompts_with_lognormal_answers(tmp_path, 60, seed=2, sigma=1.1)
    runs = [_simulated_run(tmp_path, prompts, seed) for seed in (0, 1, 2)]
    reports = [json.loads((r / "report.json").read_text()) for r in runs]
    combined = combine.main([str(r) for r in runs] + ["--out", str(tmp_path / "pooled")])
    assert combined["seeds"] == [0, 1, 2] and list(combined["rates"]) == ["rate=32", "rate=64"]
    rate = combined["rates"]["rate=64"]
    means = {p: [rep["runs"]["rate=64"][p]["latency_s"]["mean"] for rep in reports] for p in ("fcfs", "ltr")}
    for p, per_seed in means.items():  # every seed has 300 finished requests: the pooled mean is their mean
        assert rate["pooled_mean_latency_s"][p] == pytest.approx(sum(per_seed) / 3)
    assert rate["pooled_ratios"]["fcfs/ltr"] == pytest.approx(sum(means["fcfs"]) / sum(means["ltr"]))
    lo, hi = rate["ratio_range"]["fcfs/ltr"]
    per_seed_ratios = [rep["ratios"]["rate=64"]["fcfs/ltr"] for rep in reports]
    assert (lo, hi) == (pytest.approx(min(per_seed_ratios)), pytest.approx(max(per_seed_ratios)))
    assert [s["ratios"]["ltr/oracle-sjf"] for s in rate["per_seed"]] == pytest.approx(
        [rep["ratios"]["rate=64"]["ltr/oracle-sjf"] for rep in reports])
    assert rate["starvation"]["runs_judged"] == 3
    text = (tmp_path / "pooled" / "combined.md").read_text()
    assert "| **pooled** |" in text and "## rate=64" in text
    assert json.loads((tmp_path / "pooled" / "combined.json").read_text())["seeds"] == [0, 1, 2]

    # not one experiment, or not a report: each names the problem
    other = _simulated_run(tmp_path / "other", prompts, 3, "--slots", "8")
    (tmp_path / "other" / "bad").mkdir()
    (tmp_path / "other" / "bad" / "report.json").write_text("{not json")
    for bad, message in (([runs[0], runs[0]], "both ran seed 0"), ([runs[0], other], "differ in 'slots'"),
                         ([runs[0], tmp_path / "nowhere"], "no such report"),
                         ([runs[0], tmp_path / "other" / "bad"], "not a JSON report")):
        with pytest.raises(SystemExit, match=message):
            combine.main([str(b) for b in bad])
    with pytest.raises(SystemExit):
        combine.main([str(runs[0])])
    assert "at least two runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        combine.parse_args(["--help"])
    assert "--out" in capsys.readouterr().out


def _prompts_with_lengths(tmp_path, lengths: list[int]):
    """A prompts JSONL whose i-th prompt has a reference answer of about ``lengths[i]`` tokens."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "x " * (i + 2), "reference": "y " * n}) + "\n"
                               for i, n in enumerate(lengths)))
    return prompts


def test_policies_run_through_the_http_server(tmp_path):
    prompts = _prompts_with_lengths(tmp_path, [3 + 2 * i for i in range(8)])
    report = policy_bench.main(["--model", "tiny", "--prompts", str(prompts), "--split", "all", "--n", "8",
                                "--policies", "fcfs,oracle-sjf", "--rates", "40", "--slots", "2", "--via", "http",
                                "--max-output-tokens", "20", "--unloaded-probe", "2", "--no-progress",
                                "--out", str(tmp_path / "out")])
    assert report["via"].startswith("HTTP server") and report["unloaded"]["ttft_s"] > 0
    for metrics in report["runs"]["rate=40"].values():  # the oracle knew each length though HTTP carries none
        assert metrics["completed"] == 8 and metrics["incomplete_or_wrong_length"] == 0
        assert metrics["latency_s"]["max"] >= metrics["ttft_s"]["max"] > 0
        assert metrics["max_waiting_time_s"]["max"] >= metrics["ttft_s"]["max"] - 1e-9
        assert metrics["tpot_s"]["mean"] > 0 and metrics["throughput_tok_s"] > 0
        assert metrics["send_lag_s"]["p50"] > -0.01  # sent at (or after) the scheduled arrival
    assert "via the HTTP server" in (tmp_path / "out" / "report.md").read_text()


class _WholeBurst:
    """An orchestrator mix-in whose loop starts only once the whole burst is queued: a burst's requests are
    submitted (or, over HTTP, connect) one by one, and a busy machine could otherwise start the first, long arrivals
    before the short ones are in."""

    burst = 10
    whole = False

    def _take_inbox(self):
        if not self.whole:  # nothing has finished yet, so the unfinished count is the number queued
            with self._lock:
                self._lock.wait_for(lambda: self._unfinished >= self.burst or self._stopping, timeout=120)
            self.whole = True
        super()._take_inbox()


@pytest.mark.parametrize("via", ["engine", "http"])
def test_sdg_target_reports_the_time_to_that_many_completions(tmp_path, via, monkeypatch):
    # a burst of 10 with short and long answers in mixed order, all queued before the first step: the oracle
    # finishes the 4 short ones first, fcfs waits behind the long ones; the gap is hundreds of decode steps
    monkeypatch.setattr(policy_bench, "Orchestrator", type("Gated", (_WholeBurst, policy_bench.Orchestrator), {}))
    monkeypatch.setattr(http_replay, "ReplayOrchestrator",
                        type("GatedReplay", (_WholeBurst, http_replay.ReplayOrchestrator), {}))
    prompts = _prompts_with_lengths(tmp_path, [500, 4, 480, 460, 5, 440, 6, 420, 7, 400])
    report = policy_bench.main(["--model", "tiny", "--prompts", str(prompts), "--split", "all", "--n", "10",
                                "--policies", "fcfs,oracle-sjf", "--sdg-target", "4", "--slots", "2", "--via", via,
                                "--max-output-tokens", "512", "--unloaded-probe", "0", "--no-progress",
                                "--out", str(tmp_path / "out")])
    run = report["runs"]["burst"]
    for metrics in run.values():
        sdg = metrics["sdg"]
        assert sdg["target"] == 4 and 0 < sdg["seconds_to_target"] <= metrics["wall_s"]
        assert 4 <= metrics["completed"] < 10  # the rest were cancelled once the target was reached
    assert run["oracle-sjf"]["sdg"]["seconds_to_target"] < run["fcfs"]["sdg"]["seconds_to_target"]
    assert "seconds until 4 completions" in (tmp_path / "out" / "report.md").read_text()


def test_sdg_options_are_checked():
    for bad in (["--sdg-budget", "10", "--sdg-target", "5"], ["--sdg-target", "0"], ["--n", "5", "--sdg-target", "6"],
                ["--sdg-budget", "-1"], ["--via", "grpc"]):
        with pytest.raises(SystemExit):
            policy_bench.parse_args(bad)


def test_combine_treats_reports_from_before_via_as_in_process():
    from ltr_jax.bench import combine

    old = {"benchmark": "policies on the real engine"}
    assert combine._setting(old, "via") == combine._setting({**old, "via": "engine in-process"}, "via")
    assert combine._setting(old, "via") != combine._setting({**old, "via": "HTTP server"}, "via")


@pytest.fixture(scope="module")
def tiny_real_run(tmp_path_factory):
    """A `bench run` of fcfs, ltr and oracle-sjf on the tiny model at one rate, with its own ranker:
    (run directory, its report, its prompts file)."""
    from ltr_jax.models.loading import load_model
    from ltr_jax.models.ranker import RankerHead, RankerSpec
    from ltr_jax.models.ranker_checkpoint import save_ranker

    tmp_path = tmp_path_factory.mktemp("tiny_run")
    tiny = load_model("tiny")
    spec = RankerSpec(model_name=tiny.config.name, model_dim=tiny.config.dim, n_layers=2, pooling="mean",
                      hidden_dims=(8,), max_prompt_len=64)
    ranker = save_ranker(tmp_path / "ranker", RankerHead.for_spec(spec, seed=1), spec)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": "x " * (i + 1), "reference": "y " * (3 + 2 * i)})
                               + "\n" for i in range(10)))
    run_dir = tmp_path / "run"
    real = policy_bench.main(["--model", "tiny", "--prompts", str(prompts), "--split", "all", "--n", "10",
                              "--policies", "fcfs,ltr,oracle-sjf", "--rates", "40", "--slots", "2",
                              "--max-output-tokens", "24", "--ranker", str(ranker), "--unloaded-probe", "2",
                              "--out", str(run_dir), "--no-progress"])
    return run_dir, real, prompts


def test_resimulate_replays_a_real_run_with_its_own_ranker_and_step_times(tiny_real_run, tmp_path):
    run_dir, real, prompts = tiny_real_run
    result = resimulate.main([str(run_dir), "--out", str(tmp_path / "re")])
    (run,) = result["runs"]
    row = run["rates"]["rate=40"]
    assert set(row["policies"]) == {"fcfs", "ltr", "oracle-sjf"}
    for policy, e in row["policies"].items():
        assert e["real_mean_s"] == real["runs"]["rate=40"][policy]["latency_s"]["mean"]
        assert e["sim_free_mean_s"] > 0 and e["sim_charged_mean_s"] >= e["sim_free_mean_s"] - 1e-12
    assert row["policies"]["ltr"]["ranker_fraction_of_prefill"] > 0  # the run's measured ranker time
    assert "ranker_fraction_of_prefill" not in row["policies"]["fcfs"]
    assert row["policies"]["fcfs"]["sim_charged_mean_s"] == row["policies"]["fcfs"]["sim_free_mean_s"]
    step = row["step_model"]
    assert step["tpot_alone_s"] == real["unloaded"]["tpot_s"] and step["tpot_full_s"] >= step["tpot_alone_s"]
    fcfs = real["runs"]["rate=40"]["fcfs"]
    assert 0 < fcfs["busy_s"] <= fcfs["wall_s"]  # the loop's working time, from which the full step is modelled
    pooled = result["pooled_ratios"]["ltr/oracle-sjf"]
    assert pooled["real_mean_s"] == pytest.approx(row["policies"]["ltr"]["real_mean_s"]
                                                  / row["policies"]["oracle-sjf"]["real_mean_s"])
    assert "| ltr/oracle-sjf |" in (tmp_path / "re" / "report.md").read_text()
    with pytest.raises(SystemExit, match="no report.json"):
        resimulate.main([str(tmp_path)])
    sim_dir = tmp_path / "sim"
    simulate.main(["--prompts", str(prompts), "--n", "20", "--rates", "8", "--slots", "2", "--tau", "0.6",
                   "--policies", "fcfs", "--out", str(sim_dir)])
    with pytest.raises(SystemExit, match="not a `bench run` report"):
        resimulate.main([str(sim_dir)])


def test_project_simulates_the_runs_engine_on_the_workloads_bench_run_would_serve(tiny_real_run, tmp_path):
    run_dir, real, _ = tiny_real_run
    first = project.main([str(run_dir), "--n", "6,10", "--load-factors", "0.5,4", "--seeds", "3"])
    assert first["policies"] == ["fcfs", "ltr", "oracle-sjf"] and first["pool_prompts"] == 10
    assert [(r["n"], r["load_factor"]) for r in first["rows"]] == [(6, 0.5), (6, 4), (10, 0.5), (10, 4)]
    for row in first["rows"]:
        assert row["rate"] == pytest.approx(row["load_factor"] * first["capacity_req_s"])
        ratio = row["ratios"]["fcfs/ltr"]
        assert ratio["min"] <= ratio["median"] <= ratio["max"] and ratio["pooled"] > 0
    low, high = first["rows"][2], first["rows"][3]
    assert high["fcfs_over_unloaded"] > low["fcfs_over_unloaded"] >= 0.99  # more load, more queueing
    # at the run's own size, seed and rate the projection is `bench resimulate` of the run, ranker charged
    factor = real["rates"]["rate=40"] / first["capacity_req_s"]
    own = project.main([str(run_dir), "--load-factors", repr(factor), "--seeds", "1", "--out", str(tmp_path / "p")])
    replay = resimulate.main([str(run_dir)])["runs"][0]["rates"]["rate=40"]["policies"]
    for policy, mean in own["rows"][0]["mean_latency_s"].items():
        assert mean == pytest.approx(replay[policy]["sim_charged_mean_s"], rel=1e-6)
    assert "| 10 | " in (tmp_path / "p" / "report.md").read_text()
    with pytest.raises(SystemExit, match="ltr\\+starvation is never projected"):
        project.main([str(run_dir), "--policies", "fcfs,ltr+starvation"])
    with pytest.raises(SystemExit, match="--load-factors must be comma-separated numbers"):
        project.main([str(run_dir), "--load-factors", "fast"])


def test_run_step_time_interpolates_between_one_request_and_a_full_batch():
    from ltr_jax.bench.resimulate import RunStepTime

    model = RunStepTime(ttft_s=0.1, mean_prompt_len=50, tpot_alone_s=0.02, tpot_full_s=0.05, slots=4)
    assert model.prefill_time(100) == pytest.approx(0.2)
    assert [model.decode_time(b, 0) for b in (1, 2, 4)] == pytest.approx([0.02, 0.03, 0.05])


def test_an_unusable_compilation_cache_names_the_option_and_the_fix(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(SystemExit, match=r"--compilation-cache = .*cannot create.*or 'none' to disable"):
        policy_bench.main(["--model", "tiny", "--n", "1", "--policies", "fcfs", "--no-progress",
                           "--compilation-cache", str(blocker / "cache")])


def test_simulate_runs_in_worker_processes_with_the_same_report(tmp_path):
    prompts = _prompts_with_lognormal_answers(tmp_path, 40, seed=4, sigma=1.0)
    common = ["--prompts", str(prompts), "--n", "200", "--rates", "32,64", "--slots", "4", "--tau", "0.6",
              "--policies", "fcfs,ltr,ltr+starvation,oracle-sjf", "--starvation-threshold", "fcfs"]
    alone, pooled = simulate.main(common + ["--jobs", "1"]), simulate.main(common + ["--jobs", "2"])

    def results(report):
        return {k: {p: {m: v for m, v in r.items() if m != "sim_wall_s"} for p, r in runs.items()}
                for k, runs in report["runs"].items()}

    assert results(pooled) == results(alone)
    assert list(pooled["runs"]["rate=64"]) == ["fcfs", "ltr", "ltr+starvation", "oracle-sjf"]  # the order asked
    assert pooled["runs"]["rate=64"]["ltr+starvation"]["starvation_threshold_s"] == pytest.approx(
        pooled["runs"]["rate=64"]["fcfs"]["max_waiting_time_s"]["max"], abs=0.1)
    with pytest.raises(SystemExit):
        simulate.main(common + ["--jobs", "0"])


def test_step_model_scales_a_probe_ttft_longer_than_the_busy_time_leaves_for_prefills():
    """On a fast engine the probe's TTFT (wake-up and delivery included) can exceed what the fcfs run's busy time
    leaves for its prefills: the prefill is scaled to fit, the full step is the one-request step."""
    from types import SimpleNamespace

    items = [SimpleNamespace(prompt_tokens=[1] * 10, output_len=5) for _ in range(4)]  # 4 x 4 tokens / 2 slots = 8
    report = {"unloaded": {"ttft_s": 1.0, "tpot_s": 0.1}, "slots": 2, "mean_prompt_len": 10}
    model = resimulate.step_model_of(report, {"fcfs": {"busy_s": 2.8}}, items)  # 4 prefills of 1 s modelled
    assert model.ttft_s == pytest.approx((2.8 - 8 * 0.1) / 4) and model.tpot_full_s == pytest.approx(0.1)
    fits = resimulate.step_model_of(report, {"fcfs": {"busy_s": 6.0}}, items)  # the measured TTFT fits
    assert fits.ttft_s == 1.0 and fits.tpot_full_s == pytest.approx((6.0 - 4) / 8)
    with pytest.raises(SystemExit, match="shorter than its decode steps"):
        resimulate.step_model_of(report, {"fcfs": {"busy_s": 0.5}}, items)


def test_run_replays_a_named_recorded_answers_length_on_the_rankers_held_out_prompts(tmp_path, capsys):
    from ltr_jax.models.loading import load_model
    from ltr_jax.train.data import is_validation

    tiny = load_model("tiny")
    prompts = tmp_path / "alpaca.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"a{i}", "prompt": "x " * (i + 1), "reference": "r",
                                           "outputs": {"llama3-8b": "y " * (2 + i)}}) + "\n" for i in range(40)))
    items, source = policy_bench.build_items(tiny, str(prompts), "outputs.llama3-8b", 40, 512, 4096, "validation",
                                             seed=0, held_out=(0.25, "salt"))
    held = {f"a{i}" for i in range(40) if is_validation(f"a{i}", 0.25, "salt")}
    assert {it.id for it in items} == held  # 40 draws from the held-out quarter, every one of them met
    for it in items:
        assert it.output_len == len(tiny.tokenizer.encode("y " * (2 + int(it.id[1:]))))
    assert "outputs.llama3-8b" in source
    args = policy_bench.parse_args(["--prompts", str(prompts), "--lengths", "outputs.llama3-8b"])
    assert args.lengths == "outputs.llama3-8b"
    assert policy_bench.workload_rankers(args)[0].endswith("ranker_alpacaeval_llama3_8b")
    for bad in (["--lengths", "llama3-8b"], ["--lengths", "outputs.x", "--labels", str(prompts)]):
        with pytest.raises(SystemExit):
            policy_bench.parse_args(["--prompts", str(prompts), *bad])
    assert "llama3-8b" in capsys.readouterr().err


def test_online_benchmark_replays_one_stream_under_every_arm_and_summarises_it(tmp_path, capsys):
    """The tiny model end to end: fcfs, a static ranker and the two online starts on one stream; the summary
    JSON is the last stdout line and the per-window numbers are those of the arm's own requests."""
    from ltr_jax.models.loading import load_model
    from ltr_jax.models.ranker import RankerHead, RankerSpec
    from ltr_jax.models.ranker_checkpoint import save_ranker

    tiny = load_model("tiny")
    spec = RankerSpec(model_source="tiny", model_name=tiny.config.name, model_dim=tiny.config.dim, n_layers=2,
                      hidden_dims=(8,), max_prompt_len=64)
    for name, seed in (("offline", 1), ("other", 2)):
        save_ranker(tmp_path / name, RankerHead.for_spec(spec, seed=seed), spec,
                    extra={"train_config": {"val_fraction": 0.5, "split_salt": "s"}})
    prompts = tmp_path / "alpaca.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"a{i}", "prompt": "x " * (1 + i % 7), "reference": "r",
                                           "outputs": {"llama3-8b": "y " * (2 + (i * 5) % 13)}}) + "\n"
                               for i in range(36)))
    out = tmp_path / "out"
    report = online_bench.main(["--set", "model.source=tiny", "--set", "ranker.online.min_examples=8",
                                "--slots", "2", "--prompts", str(prompts), "--ranker", str(tmp_path / "offline"),
                                "--mismatched-ranker", str(tmp_path / "other"), "--length-scale", "1",
                                "--rate", "40", "--window-s", "0.5", "--out", str(out), "--json", "--no-progress"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"tau_first_window", "tau_last_window", "offline_tau", "minutes_to_90pct_offline",
            "train_share_of_busy"} <= set(summary)
    assert set(report["arms"]) == set(online_bench.ARMS)
    for arm, res in report["arms"].items():
        assert res["completed"] == 36
        assert sum(w["requests"] for w in res["windows"]) == 36
        assert res["train_share_of_busy"] == pytest.approx(res["train_seconds"] / res["busy_s"], rel=1e-2, abs=1e-3)
        if arm in online_bench.ONLINE_ARMS:
            assert res["online"]["online_rounds"] == res["online"]["online_accepted"] + \
                res["online"]["online_rejected"]
        else:
            assert res["train_seconds"] == 0
        if arm == "static":  # never retrained: its starting head, rescoring the stored features, gives each score
            assert all(abs(r["start_score"] - r["score"]) < 1e-4 for r in res["records"] if r["exact"])
    for arm, res in summary["arms"].items():
        gain = res["tau_gain_over_start_last_window"]
        assert gain["n"] == res["last_window_requests"] and gain["ci95"][0] <= gain["tau_b"] <= gain["ci95"][1]
    assert report["offline_tau"]["n"] == sum(online_bench.is_validation(f"a{i}", 0.5, "s") for i in range(36))
    assert {"report.json", "report.md", "online.png"} <= {p.name for p in out.iterdir()}
    with pytest.raises(SystemExit):
        online_bench.parse_args(["--arms", "fcfs,lifo"])


def _online_report(seed: int, rise: float) -> dict:
    """A `bench online` report of one online arm: 40 requests in each of two 10-s windows; the first window's scores
    (and every starting-head score) are the lengths blurred by noise, the last window's blurred ``rise`` times less."""
    rng = np.random.default_rng(seed)
    records = []
    for w in (0, 1):
        lengths = rng.integers(1, 400, 40)
        noise = rng.normal(scale=300, size=40)
        start = -lengths + noise
        live = start if w == 0 else -lengths + (1 - rise) * noise
        records += [{"arrival_s": 10 * w + i / 4, "finish_s": 10 * w + i / 4 + 1, "latency_s": 1.0,
                     "length": int(n), "score": float(sc), "start_score": float(st), "exact": True, "version": w,
                     "complete": True, "held_out": True} for i, (n, sc, st) in enumerate(zip(lengths, live, start))]
    arm = {"records": records, "live_since_s": {0: 0.0, 1: 9.0}, "train_share_of_busy": 0.01, "online": None,
           "mean_latency_s": 1.0}
    arm["windows"] = online_bench.windows_of(arm, 10.0)
    return {"benchmark": "online learning of the ranker on the real engine", "model": "m", "length_source": "l",
            "stream": "held-out", "n": 80, "slots": 4, "load": 1.0, "window_s": 10.0, "offline_ranker": "a",
            "mismatched_ranker": "b", "online_config": {}, "seed": seed, "offline_tau": {"tau_b": None, "ci95": None},
            "arms": {"online-mismatched": arm}}


def test_combine_pools_online_runs_into_a_mean_rise_over_seeds_with_a_t_interval(tmp_path):
    from ltr_jax.bench import combine

    paths = []
    for seed in range(5):
        path = tmp_path / f"seed{seed}" / "report.json"
        path.parent.mkdir()
        path.write_text(json.dumps(_online_report(seed, rise=0.6)))
        paths.append(str(path.parent))
    combined = combine.main(paths + ["--out", str(tmp_path / "pooled")])
    arm = combined["arms"]["online-mismatched"]
    gains = [s["tau_gain_over_start_last_window"]["tau_b"] for s in arm["per_seed"]]
    assert len(gains) == 5 and arm["gain_over_start_last_window"]["mean"] == pytest.approx(np.mean(gains), abs=1e-4)
    lo, hi = arm["gain_over_start_last_window"]["ci95"]
    assert 0 < lo < np.mean(gains) < hi and arm["gain_over_start_last_window"]["above_zero"] == 5
    assert arm["rise_first_to_last"]["seeds"] == 5
    assert "gain, mean over 5 seeds" in (tmp_path / "pooled" / "combined.md").read_text()
    assert arm["last_window_latency_vs_static"] is None  # no static arm ran
    ratio = combine.pooled_ratio([1.0, 1.2, 0.8])
    assert ratio["geometric_mean"] == pytest.approx(0.96 ** (1 / 3), abs=1e-3) and ratio["within_10pct"] == 2
    assert ratio["ci95"][0] < ratio["geometric_mean"] < ratio["ci95"][1] and combine.pooled_ratio([1.0]) is None
    flat = tmp_path / "flat" / "report.json"  # no learning: every seed's gain is 0 and the interval says so
    flat.parent.mkdir()
    flat.write_text(json.dumps(_online_report(7, rise=0.0)))
    same = combine.combine([str(flat.parent), paths[0]])["arms"]["online-mismatched"]
    assert same["per_seed"][0]["tau_gain_over_start_last_window"]["tau_b"] == 0
    other = _online_report(9, rise=0.6) | {"load": 1.25}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="differ in 'load'"):
        combine.main([paths[0], str(tmp_path / "other.json")])


def test_online_summary_reads_the_first_window_that_reaches_the_offline_target():
    windows = [{"window": 0, "tau_b": 0.2, "reached_s": 50.0}, {"window": 1, "tau_b": None, "reached_s": 90},
               {"window": 2, "tau_b": 0.46, "reached_s": 150.0}, {"window": 3, "tau_b": 0.5, "reached_s": 200}]
    assert online_bench.minutes_to_fraction(windows, 0.45) == 2.5
    assert online_bench.minutes_to_fraction(windows, 0.6) is None
    assert online_bench.minutes_to_fraction(windows, None) is None
    records = [{"arrival_s": a, "finish_s": a + 1, "latency_s": 1.0, "length": 5 + i, "score": -i, "exact": True,
                "version": v, "complete": True, "held_out": False}
               for i, (a, v) in enumerate([(0.1, 0)] * 6 + [(1.2, 1)] * 11 + [(1.4, 2)] * 3)]
    ws = online_bench.windows_of({"records": records, "live_since_s": {0: 0.0, 1: 1.7, 2: 2.5}}, window_s=1.0)
    assert [(w["requests"], w["head_version"], w["reached_s"]) for w in ws] == [(6, 0, 1.0), (14, 1, 2.0)]
    assert ws[0]["tau_b"] is None and ws[1]["tau_b"] == pytest.approx(1.0)  # under 10 requests: no tau
    start, end = online_bench.last_window(records, window_s=1.0)  # a full second back from the last arrival
    assert start == pytest.approx(0.4) and 1.4 < end < 1.4 + 1e-9
    assert sum(start <= r["arrival_s"] < end for r in records) == 14
    steps = [(0.010, 2, False), (0.020, 2, True), (0.005, 1, False)]
    times = online_bench.step_times(steps, slots=2)
    assert times["full_batch_steps"]["training"]["max"] == 20.0
    assert times["full_batch_steps"]["not_training"]["max"] == 10.0
    assert times["all_steps"]["not_training"]["mean"] == 7.5


def test_a_windows_latency_ratio_pairs_the_same_requests_and_carries_a_bootstrap_ci():
    from ltr_jax.bench.online_bench import latency_ratio_with_ci

    def rec(arrival, latency, complete=True):
        return {"arrival_s": arrival, "latency_s": latency, "complete": complete}

    reference = [rec(t, 2.0 + t % 3) for t in range(120)]
    doubled = [rec(r["arrival_s"], 2 * r["latency_s"]) for r in reference]
    exact = latency_ratio_with_ci(doubled, reference, 60.0, 120.0)
    assert exact == {"ratio": 2.0, "ci95": [2.0, 2.0], "n": 60}  # only the window's 60 requests, paired
    noisy = [rec(r["arrival_s"], r["latency_s"] * (1.5 if i % 2 else 0.5)) for i, r in enumerate(reference)]
    noisy.append(rec(200.0, 1.0))  # a request the reference lacks is left out
    noisy[61] = rec(61.0, 99.0, complete=False)  # and one that did not complete
    out = latency_ratio_with_ci(noisy, reference, 60.0, 120.0, seed=1)
    assert out["n"] == 59 and out["ci95"][0] < out["ratio"] < out["ci95"][1]
    assert 0.5 < out["ci95"][0] and out["ci95"][1] < 1.5
    assert latency_ratio_with_ci(noisy, reference, 500.0, 560.0) == {"ratio": None, "ci95": None, "n": 0}
