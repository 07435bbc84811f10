"""scripts/device_check.sh in its CPU smoke mode (what it runs on a GPU, at toy sizes), and the real-shape engine
benchmark's report: roofline arithmetic, the Llama-3 presets, host overhead, step times `bench simulate` can fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import pytest

from ltr_jax.bench.engine_bench import KNOWN_BANDWIDTH_GBPS, kv_bytes_per_token, step_weight_bytes
from ltr_jax.models.config import preset
from ltr_jax.models.loading import resolve_weight_dtype
from ltr_jax.sim.step_time import MeasuredStepTime

REPO = Path(__file__).resolve().parents[1]


def test_llama3_presets_and_the_roofline_bytes():
    c = preset("llama3-8b").replace(dtype="bfloat16")
    assert c == preset("llama-3-8b").replace(dtype="bfloat16") and preset("llama3.1-8b").rope_scaling is not None
    assert preset("llama3-70b").n_layers == 80
    # an 8B step reads every weight but the embedding table (gathered, a row per slot): ~15 GB in bf16
    assert step_weight_bytes(c) == (c.num_params() - c.vocab_size * c.dim) * 2
    assert 14.5e9 < step_weight_bytes(c) < 15.5e9
    assert kv_bytes_per_token(c) == 2 * 32 * 8 * 128 * 2  # 128 KiB per token
    assert dict(KNOWN_BANDWIDTH_GBPS)["H200"] == 4800.0 and dict(KNOWN_BANDWIDTH_GBPS)["H100"] == 3350.0
    with pytest.raises(ValueError, match="unknown preset 'llama9'"):
        preset("llama9")


def test_device_check_cpu_smoke(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh"), "--cpu-smoke"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    assert json.loads((out / "devices.json").read_text())["backend"] == "cpu"
    assert "2 passed" in (out / "greedy_test.txt").read_text()
    report = json.loads((out / "engine.json").read_text())
    assert report["layers"] == 2 and report["dtype"] == "float32" and report["hbm_gbps"] > 0
    assert [(r["batch"], r["context"]) for r in report["results"]] == [(1, 32), (4, 32), (1, 64), (4, 64)]
    for r in report["results"]:
        expected = (r["weight_bytes"] + r["kv_bytes_read"]) / (report["hbm_gbps"] * 1e9) * 1e3
        assert r["roofline_ms"] == pytest.approx(expected, rel=1e-3, abs=1e-4)
        assert r["step_over_roofline"] == pytest.approx(r["step_ms"] / r["roofline_ms"], rel=0.02)
        # each batch runs in the weights' dtype `model.weight_dtype: auto` picks for it on this CPU
        assert r["weight_dtype"] == (resolve_weight_dtype("auto", "float32", r["batch"]) or "float32")
        assert r["weight_bytes"] == report["weight_bytes_per_step"] * jnp.dtype(r["weight_dtype"]).itemsize // 4
        assert r["weight_bytes_per_token"] == r["weight_bytes"] // r["batch"]
        read = r["weight_bytes"] + r["kv_bytes_read"]
        assert r["achieved_gbps"] == pytest.approx(read / (r["step_ms"] / 1e3) / 1e9, rel=0.02)
        floor = r["batch"] * report["bandwidth_gbps"] * 1e9 / read
        assert r["bandwidth_floor_tokens_per_s"] == pytest.approx(floor, rel=1e-3)
        assert r["share_of_floor"] == pytest.approx(r["tokens_per_s"] / floor, rel=0.02)
        assert r["kv_bytes_read"] > 0 and r["prefill_tokens_per_s"] > 0 and r["compile_s"] >= 0
        if r["context"] == 32:  # host overhead is measured at the first context
            assert r["host_steps"] >= 4 and r["host_overhead_ms"] >= 0 and r["decode_pipeline"] is True
        else:
            assert "host_overhead_ms" not in r
    MeasuredStepTime.from_json(out / "engine.json")  # the step times simulate fits
    simulated = json.loads((out / "simulate" / "report.json").read_text())
    assert "engine.json" in json.dumps(simulated)
