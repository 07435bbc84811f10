"""Run the server inside this process on a background thread (tests, notebooks, benchmarks).

`serve_in_thread(config)` builds the runtime, starts uvicorn on a free loopback port (``server.port = 0``) in a
thread and yields a handle with the URL; leaving the ``with`` block shuts it down (orchestrator included).
Signals are not captured off the main thread; `ServerHandle.drain()` does what SIGTERM does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from ltr_jax.config import ServeConfig
from ltr_jax.server.app import ServerState, create_app
from ltr_jax.server.http_server import GracefulServer, uvicorn_config
from ltr_jax.server.runtime import Runtime, build_runtime


@dataclass
class ServerHandle:
    url: str
    server: GracefulServer
    runtime: Runtime
    state: ServerState
    thread: threading.Thread

    def drain(self) -> None:
        self.server.request_drain()


@contextlib.contextmanager
def serve_in_thread(config: ServeConfig, api_key: str | None = None, start_timeout_s: float = 120.0,
                    runtime: Runtime | None = None) -> Iterator[ServerHandle]:
    """Serve ``config`` on 127.0.0.1 (any free port) from a thread for the duration of the block."""
    config = dataclasses.replace(config, server=dataclasses.replace(config.server, host="127.0.0.1", port=0))
    runtime = runtime or build_runtime(config)
    app = create_app(runtime, api_key=api_key)
    uv = uvicorn_config(app, config.server, log_level="warning", timeout_graceful_shutdown=5)
    server = GracefulServer(uv, app.state.serving, drain_timeout_s=config.server.drain_timeout_s)
    thread = threading.Thread(target=server.run, name="ltr-jax-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the in-process server did not start")
        time.sleep(0.02)
    try:
        yield ServerHandle(server.url or "http://{}:{}".format(*server.bound_address()), server, runtime,
                           app.state.serving, thread)
    finally:
        server.should_exit = True
        thread.join(30)
