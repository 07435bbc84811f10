"""200 concurrent streaming clients against the tiny model over loopback (the same test scripts/load_test.py runs
against a real server): every admitted request completes exactly once with all its tokens, the rest get 429, and
clients that hang up mid-stream leave no slot occupied."""

from __future__ import annotations

from pathlib import Path

import pytest

from ltr_jax.config import load_config
from ltr_jax.server.inprocess import serve_in_thread
from ltr_jax.server.loadgen import load_test_ok, run_load_test

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve_tiny.yaml"
CLIENTS = 200
MAX_TOKENS = 64


@pytest.fixture(scope="module")
def server():
    cfg = load_config(TINY_CONFIG, ["logging.level=WARNING", "engine.num_slots=4", "server.max_queue=16",
                                    "engine.max_seq_len=256", "engine.warmup_max_len=128"])
    with serve_in_thread(cfg) as handle:
        yield handle


def test_200_streaming_clients_complete_exactly_once_or_get_429(server):
    summary = run_load_test(server.url, clients=CLIENTS, max_tokens=MAX_TOKENS, timeout_s=120)
    assert summary["accepted"] + summary["rejected_429"] == CLIENTS, summary["examples_other"]
    assert summary["other_status"] == 0
    assert summary["accepted"] >= 4 + 16  # at least the slots and the queue were filled at once
    assert summary["rejected_429"] > 0  # and the bound held
    assert summary["rejected_with_retry_after"] == summary["rejected_429"]
    assert summary["completed_exactly_once_full_tokens"] == summary["accepted"], summary["examples_broken"]
    after = summary["server_after"]
    assert after["running_slots"] == 0 and after["queue_length"] == 0
    assert after["finished_length"] == summary["accepted"]  # the loop saw each admitted request finish once
    assert after["generated_tokens"] == MAX_TOKENS * summary["accepted"]
    assert load_test_ok(summary)


def test_clients_hanging_up_mid_stream_leave_no_slot_occupied(server):
    summary = run_load_test(server.url, clients=CLIENTS, max_tokens=MAX_TOKENS, disconnect_fraction=0.2,
                            disconnect_after_chunks=1, timeout_s=120)
    assert summary["other_status"] == 0
    assert summary["disconnected_mid_stream"] >= 1
    assert summary["completed_exactly_once_full_tokens"] == summary["accepted"] - summary["disconnected_mid_stream"]
    after = summary["server_after"]
    assert after["running_slots"] == 0 and after["queue_length"] == 0
    # every admitted request finished exactly once in the loop: cut short (cancelled) or run out (length)
    assert after["finished_length"] + after["finished_cancelled"] == summary["accepted"]
    assert 1 <= after["finished_cancelled"] <= summary["disconnected_mid_stream"]
    assert load_test_ok(summary)
