"""`python -m ltr_jax.bench server`: the serving process as a user meets it: start-up, footprint, hostile clients.

Starts ``python -m ltr_jax.serve`` as a child process (the default config plus ``--config`` / ``--set``; with
``--cold`` on an empty compilation cache), times it to its ready line, reads its resident memory then and once its
idle warm-up is done (``/health``'s ``warmup_pending`` at 0) and it has answered one ordinary chat request (the
idle level the attacks are judged against), then
runs each attack below while a probe asks ``/health`` every 0.1 s, and reports per attack: the status and message
the attacker got, the probe's slowest answer, resident memory before and after (against the idle level), and
whether an ordinary chat request still succeeds afterwards. ``--json`` prints the report as the last line.

The attacks (`ATTACKS`): a 50 MB chat body, a 50 MB completions prompt, 100,000 chat messages, a 10 MB stop-string
list, and 30 s of slow-loris clients (connections trickling header bytes, one trickling its body). The attack
functions take a URL and are used by the tests against the in-process server as well.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

import httpx

from ltr_jax.machine import cpu_model, resident_mb

MB = 2**20


@dataclass
class Reply:
    """What a raw HTTP exchange got back (status None: the connection broke before a status line)."""

    status: int | None
    message: str = ""
    seconds: float = 0.0


def _address(url: str) -> tuple[str, int]:
    host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
    return host.strip("[]"), int(port)


def _read_reply(sock: socket.socket) -> bytes:
    data = b""
    with contextlib.suppress(OSError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                if length and len(body) >= int(length.group(1)):
                    break
    return data


def _parse_reply(data: bytes, seconds: float) -> Reply:
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3})", head)
    if not match:
        return Reply(None, "no HTTP status line", seconds)
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode(errors="replace")
    return Reply(int(match.group(1)), message, seconds)


def raw_request(url: str, path: str, headers: dict[str, str], body_chunks: Iterable[bytes],
                timeout_s: float = 120.0) -> Reply:
    """POST ``body_chunks`` over a bare socket (as a careless or hostile client would: no client library limits),
    reading the answer even when the server answers before the body is sent in full."""
    host, port = _address(url)
    t0 = time.monotonic()
    with socket.create_connection((host, port), timeout=timeout_s) as sock:
        lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers.items())]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        with contextlib.suppress(OSError):  # the server may answer and close before it has read everything
            for chunk in body_chunks:
                sock.sendall(chunk)
        return _parse_reply(_read_reply(sock), time.monotonic() - t0)


def _json_post(url: str, path: str, payload_parts: list[bytes], chunk: int = MB) -> Reply:
    """POST a JSON body given as parts (joined lazily, so a 50 MB body is never held twice), with its length."""
    size = sum(len(p) for p in payload_parts)

    def chunks():
        for part in payload_parts:
            for i in range(0, len(part), chunk):
                yield part[i:i + chunk]

    return raw_request(url, path, {"Content-Type": "application/json", "Content-Length": str(size)}, chunks())


def big_chat_body(url: str, model: str, mb: float = 50) -> Reply:
    content = b"x" * int(mb * MB)
    head = json.dumps({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": ""}]})
    before, after = head.encode().split(b'"content": ""')
    return _json_post(url, "/v1/chat/completions", [before, b'"content": "', content, b'"', after])


def big_completion_prompt(url: str, model: str, mb: float = 50) -> Reply:
    head = json.dumps({"model": model, "max_tokens": 4, "prompt": ""}).encode()
    before, after = head.split(b'"prompt": ""')
    return _json_post(url, "/v1/completions", [before, b'"prompt": "', b"y" * int(mb * MB), b'"', after])


def many_messages(url: str, model: str, count: int = 100_000) -> Reply:
    body = json.dumps({"model": model, "max_tokens": 4,
                       "messages": [{"role": "user", "content": ""}] * count}).encode()
    return _json_post(url, "/v1/chat/completions", [body])


def big_stop_list(url: str, model: str, mb: float = 10) -> Reply:
    n = int(mb * MB) // 14
    body = json.dumps({"model": model, "max_tokens": 4, "prompt": "hi", "stop": ["stop-string"] * n}).encode()
    return _json_post(url, "/v1/completions", [body])


def slow_loris(url: str, model: str, seconds: float = 30.0, connections: int = 50) -> Reply:
    """``connections`` clients trickle request-header bytes and one trickles its body, about 10 bytes a second each,
    for up to ``seconds``; the reply is the status most of them got, with how many were cut off."""
    host, port = _address(url)
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
    results: list[Reply] = []

    def trickle(first: bytes, drip: bytes) -> None:
        t0 = time.monotonic()
        data = b""
        try:
            with socket.create_connection((host, port), timeout=seconds + 30) as sock:
                sock.sendall(first)
                sock.settimeout(1.0)
                i = 0
                while time.monotonic() - t0 < seconds:
                    try:
                        sock.send(drip[i % len(drip):i % len(drip) + 10])
                        i += 10
                        got = sock.recv(65536)
                    except TimeoutError:
                        continue
                    if not got:
                        break
                    data += got
                    if b"\r\n\r\n" in data:
                        data += _read_reply(sock)
                        break
        except OSError:
            pass
        results.append(_parse_reply(data, time.monotonic() - t0))

    body = json.dumps({"model": model, "prompt": "hi " * 200, "max_tokens": 2}).encode()
    threads = [threading.Thread(target=trickle, args=(head, b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n"))
               for _ in range(connections)]
    threads.append(threading.Thread(target=trickle, args=(
        head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode(), body)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [r.status for r in results]
    common = max(set(statuses), key=statuses.count)
    cut = sum(s is not None and 400 <= s < 500 for s in statuses)
    example = next((r.message for r in results if r.status == common), "")
    return Reply(common, f"{cut}/{len(results)} slow clients cut off with a 4xx; e.g.: {example}",
                 max(r.seconds for r in results))


ATTACKS: dict[str, Callable[[str, str], Reply]] = {
    "chat_body_50mb": big_chat_body,
    "completion_prompt_50mb": big_completion_prompt,
    "messages_100k": many_messages,
    "stop_list_10mb": big_stop_list,
    "slow_loris_30s": slow_loris,
}


@dataclass
class HealthProbe:
    """Asks ``/health`` every ``interval_s`` on its own thread; keeps each answer's latency (None: no answer)."""

    url: str
    interval_s: float = 0.1
    latencies: list[float | None] = field(default_factory=list)

    def __post_init__(self):
        self._stop = threading.Event()
        self._first = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                t0 = time.monotonic()
                try:
                    ok = client.get(f"{self.url}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies.append(time.monotonic() - t0 if ok else None)
                self._first.set()
                self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        """Starts probing and returns once the first answer is in (the attack then starts with a probe running)."""
        self._thread.start()
        self._first.wait(60)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def worst_s(self) -> float | None:
        """The slowest answer (None when none came; infinity when one failed)."""
        if not self.latencies:
            return None
        return float("inf") if any(x is None for x in self.latencies) else max(self.latencies)


def ordinary_chat_ok(url: str, model: str) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
    try:
        return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).status_code == 200
    except httpx.HTTPError:
        return False


def run_attacks(url: str, model: str, pid: int, names: Iterable[str] = tuple(ATTACKS),
                settle_s: float = 2.0) -> list[dict]:
    """Each named attack with a `/health` probe beside it; resident memory of ``pid`` before and after."""
    rows = []
    for name in names:
        before = resident_mb(pid)
        with HealthProbe(url) as probe:
            reply = ATTACKS[name](url, model)
        time.sleep(settle_s)  # let freed buffers go back before reading the footprint
        after = resident_mb(pid)
        rows.append({"attack": name, "status": reply.status, "message": reply.message,
                     "attack_seconds": round(reply.seconds, 2),
                     "health_worst_s": None if probe.worst_s is None else round(probe.worst_s, 3),
                     "health_probes": len(probe.latencies), "resident_mb_before": before, "resident_mb_after": after,
                     "ordinary_request_ok_after": ordinary_chat_ok(url, model)})
    return rows


def start_server(extra_args: list[str], env: dict[str, str] | None = None,
                 timeout_s: float = 1800.0) -> tuple[subprocess.Popen, str, float, list[str]]:
    """(process, URL, seconds to its ready line, the lines it printed before) for ``python -m ltr_jax.serve``."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "ltr_jax.serve", "--set", "server.port=0", *extra_args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line.rstrip())
        print(line, end="", file=sys.stderr, flush=True)
        match = re.search(r"ltr-jax ready on (http://\S+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, match.group(1), time.monotonic() - t0, lines
        if time.monotonic() - t0 > timeout_s:
            break
    proc.kill()
    raise RuntimeError("the server did not print its ready line:\n" + "\n".join(lines[-20:]))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.bench server", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="serve YAML (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a serve config override (repeatable)")
    p.add_argument("--cold", action="store_true", help="start on an empty JAX compilation cache")
    p.add_argument("--attacks", default=",".join(ATTACKS), help=f"comma-separated subset of {','.join(ATTACKS)}")
    p.add_argument("--idle-warmup-timeout-s", type=float, default=900.0,
                   help="wait this long at most for the server's idle warm-up before the attacks")
    p.add_argument("--out", default=None, help="write the report JSON here")
    p.add_argument("--json", action="store_true", help="print the report as JSON on the last line")
    args = p.parse_args(argv)
    names = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        p.error(f"unknown attack(s) {unknown}; choose from {list(ATTACKS)}")
    extra = (["--config", args.config] if args.config else []) + [x for o in args.overrides for x in ("--set", o)]
    with tempfile.TemporaryDirectory() as cache:
        if args.cold:
            extra += ["--set", f"engine.compilation_cache_dir={cache}"]
        proc, url, ready_s, lines = start_server(extra)
        try:
            health = httpx.get(f"{url}/health", timeout=30).json()
            model = health["model"]
            at_ready = resident_mb(proc.pid)
            t0 = time.monotonic()
            while health.get("warmup_pending") and time.monotonic() - t0 < args.idle_warmup_timeout_s:
                time.sleep(1.0)
                health = httpx.get(f"{url}/health", timeout=30).json()
            idle_warmup_s = time.monotonic() - t0
            first_ok = ordinary_chat_ok(url, model)  # the idle level is that of a server that has served
            idle = resident_mb(proc.pid)
            rows = run_attacks(url, model, proc.pid, names)
            served = ordinary_chat_ok(url, model)
        finally:
            proc.terminate()
            proc.wait(60)
    report = {"command": "python -m ltr_jax.bench server " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": cpu_model(), "cores": os.cpu_count(), "cold_compile_cache": args.cold,
              "seconds_to_ready": round(ready_s, 1), "resident_mb_at_ready": at_ready,
              "idle_warmup_seconds": round(idle_warmup_s, 1), "idle_warmup_left": health.get("warmup_pending"),
              "resident_mb_idle": idle, "policy": health.get("policy"),
              "phase_lines": [line for line in lines if "warm-up" in line or "loaded" in line],
              "attacks": rows, "serves_after_all": served,
              "ok": first_ok and served and all(r["status"] is not None and 400 <= r["status"] < 500
                                   and r["resident_mb_after"] - idle <= 100 and r["ordinary_request_ok_after"]
                                   for r in rows)}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for r in rows:
        print(f"{r['attack']:24s} HTTP {r['status']}  /health worst {r['health_worst_s']} s  resident "
              f"{r['resident_mb_before']} -> {r['resident_mb_after']} MB (idle {idle})  {r['message'][:90]}",
              file=sys.stderr)
    if args.json:
        print(json.dumps(report))
