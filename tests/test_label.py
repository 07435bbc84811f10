"""The labeling job: rows for every prompt exactly once, resumable after an interruption (even mid-line)."""

from __future__ import annotations

import json

import pytest

from ltr_jax.train.label import main as label_main


def _prompts_file(tmp_path, n: int):
    path = tmp_path / "prompts.jsonl"
    with open(path, "w") as fh:
        fh.writelines(json.dumps({"id": f"p{i}", "source": "test", "prompt": "word " * (1 + i % 7),
                                 "reference": "answer " * (1 + i % 5)}) + "\n" for i in range(n))
    return path


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_label_job_resumes_without_redoing_finished_prompts(tmp_path):
    prompts = _prompts_file(tmp_path, 10)
    out = tmp_path / "labels.jsonl"
    common = ["--model", "tiny", "--prompts", str(prompts), "--out", str(out), "--slots", "3",
              "--max-tokens", "12", "--temperature", "1.0", "--seed", "3"]
    label_main([*common, "--limit", "4"])  # a first, partial run
    first = _rows(out)
    assert len(first) == 4
    with open(out, "a") as fh:  # the process was killed while writing a row
        fh.write('{"id": "p9", "prompt_tok')
    label_main(common)
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(10))  # each prompt exactly once
    assert rows[:4] == first  # finished rows were kept, not redone
    for r in rows:
        assert 1 <= r["output_tokens"] <= 12 and r["finish_reason"] in ("stop", "length") and r["prompt_tokens"] > 0
        assert "prompt" not in r  # ids and lengths only, never prompt text
    meta = json.loads((tmp_path / "labels.jsonl.meta.json").read_text())
    assert meta["max_tokens"] == 12 and meta["temperature"] == 1.0 and "command" in meta
    label_main(common)  # nothing left to do: the file is unchanged
    assert _rows(out) == rows


def test_trace_length_labels_count_reference_tokens(tmp_path):
    prompts = _prompts_file(tmp_path, 5)
    out = tmp_path / "trace.jsonl"
    label_main(["--model", "tiny", "--prompts", str(prompts), "--out", str(out), "--trace-lengths"])
    rows = {r["id"]: r for r in _rows(out)}
    from ltr_jax.models.tiny import byte_level_tokenizer

    tok = byte_level_tokenizer()
    assert rows["p3"]["output_tokens"] == len(tok.encode("answer " * 4))
    assert all(r["finish_reason"] == "reference" for r in rows.values())


def test_label_job_refuses_the_package_data_and_reports_capped_labels(tmp_path, capsys):
    from ltr_jax.train.label import PACKAGE_DATA

    prompts = _prompts_file(tmp_path, 6)
    with pytest.raises(SystemExit):
        label_main(["--model", "tiny", "--prompts", str(prompts), "--out", str(PACKAGE_DATA / "labels" / "x.jsonl")])
    assert "--overwrite-package-data" in capsys.readouterr().err
    assert not (PACKAGE_DATA / "labels" / "x.jsonl").exists()
    out = tmp_path / "labels.jsonl"
    label_main(["--model", "tiny", "--prompts", str(prompts), "--out", str(out), "--slots", "2", "--max-tokens", "3",
                "--temperature", "1.0"])
    captured = capsys.readouterr()
    report = json.loads(captured.out.strip().splitlines()[-1])
    rows = _rows(out)
    capped = sum(r["finish_reason"] == "length" for r in rows)
    assert report["finish_reasons"].get("length", 0) == capped and sum(report["finish_reasons"].values()) == 6
    assert report["capped_share"] == round(capped / 6, 4)
    # the cache is sized to the longest prompt + --max-tokens (a power of two), not the 2048-token default context
    longest = max(r["prompt_tokens"] for r in rows)
    assert f"engine.max_seq_len {1 << (longest + 3 + 1).bit_length()}" in captured.err
