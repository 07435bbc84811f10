"""The uvicorn server with a graceful drain, its connection-level limits, and the start-up "ready" line.

`uvicorn_config` builds the one uvicorn configuration every entry point serves with: keep-alive timeout and
connection cap from ``server.*``, and an HTTP protocol that answers 408 and closes a connection whose request
headers do not arrive in full within ``server.header_timeout_s`` (uvicorn itself waits for headers forever, so a
slow-loris client could hold connections open; bodies are timed by the app, ``server.body_timeout_s``).

On the first SIGTERM/SIGINT (or `request_drain()` from another thread) the server stops admitting work (new
generation requests get 503, ``/health`` says ``draining``), waits up to ``drain_timeout_s`` for every admitted
request to be answered in full, cancels whatever is still running when that time is up, then lets uvicorn close
the listening socket and exit. A second signal exits at once. The process exits normally (status 0) either way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import sys
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ltr_jax.config import ServerSection
from ltr_jax.server.app import ServerState

log = logging.getLogger(__name__)


class _HeaderTimedProtocol(H11Protocol):
    """h11 connection protocol with a deadline on the request line and headers of every request."""

    header_timeout_s: float = 10.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers():  # the first bytes of a next request on a kept-alive connection
            self._arm_header_timer()
        super().data_received(data)
        if not self._waiting_for_headers():  # its headers are in: the app times the body
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or not self._waiting_for_headers():
            return
        body = json.dumps({"error": {
            "message": f"the request headers did not arrive within {self.header_timeout_s:g} s "
                       "(server.header_timeout_s)", "type": "invalid_request_error", "param": None,
            "code": "request_timeout"}}).encode()
        head = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
        self.transport.write(head + body)
        self.transport.close()


def uvicorn_config(app, server: ServerSection, log_level: str = "info", access_log: bool = False,
                   **overrides) -> uvicorn.Config:
    """The uvicorn configuration for ``app`` under the ``server`` section (``overrides``: host, port, ...)."""
    protocol = type("HeaderTimedProtocol", (_HeaderTimedProtocol,), {"header_timeout_s": server.header_timeout_s})
    options = {"host": server.host, "port": server.port, "log_level": log_level, "access_log": access_log,
               "lifespan": "on", "http": protocol, "timeout_keep_alive": server.keep_alive_timeout_s,
               "limit_concurrency": server.max_connections}
    return uvicorn.Config(app, **(options | overrides))


class GracefulServer(uvicorn.Server):
    """`uvicorn.Server` whose exit signals drain in-flight requests first."""

    def __init__(self, config: uvicorn.Config, state: ServerState, drain_timeout_s: float,
                 ready_message: str | None = None):
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.ready_message = ready_message
        self.url: str | None = None
        self.drained_cleanly: bool | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if not self.started or self.should_exit:
            return
        host, port = self.bound_address()
        self.url = f"http://{host}:{port}"
        if self.ready_message is not None:
            print(self.ready_message.replace("{url}", self.url), flush=True)

    def bound_address(self) -> tuple[str, int]:
        """(host to reach the server at, actual port) — port 0 in the config means 'any free port'."""
        sock = self.servers[0].sockets[0]
        host, port = sock.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return (f"[{host}]" if ":" in host else host), port

    # ----------------------------------------------------------------------------------------- shutdown
    def handle_exit(self, sig: int, frame) -> None:  # runs in the main thread (signal handler)
        if self.state.draining or self._loop is None:
            log.warning("second exit signal: stopping now without waiting for in-flight requests")
            self.should_exit = True
            self.force_exit = True
            return
        self._loop.call_soon_threadsafe(self._begin_drain)

    def request_drain(self) -> None:
        """Thread-safe: start the graceful drain (what SIGTERM does)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._begin_drain)

    def _begin_drain(self) -> None:
        if self.state.draining:
            return
        self.state.draining = True
        log.info("draining: %d request(s) in flight, up to %.1f s to finish", self.state.inflight,
                 self.drain_timeout_s)
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        t0 = time.monotonic()
        idle = self.state.idle
        if idle is not None and self.state.inflight > 0:
            try:
                await asyncio.wait_for(idle.wait(), timeout=self.drain_timeout_s)
            except TimeoutError:
                pass
        left = self.state.inflight
        self.drained_cleanly = left == 0
        if left:
            log.warning("drain timeout (%.1f s): cancelling %d unfinished request(s)", self.drain_timeout_s, left)
            orch = self.state.runtime.orchestrator
            await asyncio.to_thread(orch.stop, False, 10.0)
            if idle is not None:
                try:
                    await asyncio.wait_for(idle.wait(), timeout=2.0)
                except TimeoutError:
                    pass
        else:
            log.info("drained in %.2f s", time.monotonic() - t0)
        self.config.timeout_graceful_shutdown = 2
        self.should_exit = True


def ready_line(model: str, policy: str, warmup_s: float | None, api_key: bool, resident_mb: float | None = None
               ) -> str:
    """The line printed once the server listens (the placeholder {url} is filled in then)."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello"}], "max_tokens": 32})
    auth = ' -H "Authorization: Bearer $LTR_JAX_API_KEY"' if api_key else ""
    warm = f", warmup {warmup_s:.1f} s" if warmup_s is not None else ""
    warm += f", resident memory {resident_mb:.0f} MB" if resident_mb else ""
    curl = f"curl -s {{url}}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"
    return f"ltr-jax ready on {{url}} (model {model}, policy {policy}{warm}) -- try: {curl}"


def run_server(server: GracefulServer) -> int:
    """Run until shut down; 0 on a normal exit, 1 when start-up failed."""
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits with 3 when the lifespan or the socket bind fails
        return int(exc.code or 1)
    if not server.started:
        print("ltr-jax: the HTTP server did not start (see the log above)", file=sys.stderr)
        return 1
    return 0
