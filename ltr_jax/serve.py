"""`python -m ltr_jax.serve`: the OpenAI-compatible server, configured by YAML plus ``--set`` overrides.

    python -m ltr_jax.serve                                    # the built-in defaults (SmolLM2-135M)
    python -m ltr_jax.serve --config configs/serve_tiny.yaml   # tiny random model, for smoke tests
    python -m ltr_jax.serve --set server.port=9000 --set scheduler.policy=fcfs
    python -m ltr_jax.serve --print-config                     # the resolved config, then exit
    python -m ltr_jax.serve --help-config                      # every key with its default and meaning

A configuration problem (unknown key, wrong type, out of range, unknown policy, a model or ranker that cannot
be loaded) prints one message naming the key and exits with status 2. SIGTERM/SIGINT drain in-flight requests
(up to ``server.drain_timeout_s``) and exit with status 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

import yaml

from ltr_jax.config import ConfigError, ServeConfig, config_to_dict, describe_schema, load_config

API_KEY_ENV = "LTR_JAX_API_KEY"

log = logging.getLogger("ltr_jax.serve")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ltr_jax.serve", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=str, default=None,
                   help="YAML config listing the keys to change (default: none, the built-in defaults, which "
                        "configs/serve_smollm2.yaml writes out)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key, e.g. --set server.port=9000 (repeatable; VALUE is YAML: 3, true, null)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--help-config", action="store_true", help="list every config key and exit")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> ServeConfig:
    return load_config(args.config, args.overrides, ServeConfig)


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for noisy in ("absl", "jax._src"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level)))


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be listened on (None when it can, or for port 0: any free port)."""
    if port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            probe.bind((host, port))
        except OSError as err:
            return str(err)
    return None


def policy_in_force(runtime) -> str:
    """The scheduling order the server applies, and what was configured when that differs."""
    configured = runtime.config.scheduler.policy
    if runtime.effective_policy == configured:
        return configured
    return f"{runtime.effective_policy} (configured {configured}, no ranker)"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_config:
        print("\n".join(describe_schema(ServeConfig)))
        return 0
    try:
        config = resolve_config(args)
    except ConfigError as err:
        print(f"ltr-jax: config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    setup_logging(config.logging.level)
    api_key = config.server.api_key or os.environ.get(API_KEY_ENV) or None

    busy = port_in_use(config.server.host, config.server.port)
    if busy:  # said now, not after minutes of loading and compiling
        print(f"ltr-jax: cannot listen on {config.server.host}:{config.server.port}: {busy}; stop what holds it or "
              f"choose another port with --set server.port=N", file=sys.stderr)
        return 2
    from ltr_jax.server.app import create_app
    from ltr_jax.server.http_server import GracefulServer, ready_line, run_server, uvicorn_config
    from ltr_jax.server.runtime import StartupError, build_runtime

    try:
        runtime = build_runtime(config)
    except StartupError as err:
        print(f"ltr-jax: config error: {err}", file=sys.stderr)
        return 2
    app = create_app(runtime, api_key=api_key)
    server_cfg = config.server
    uv_config = uvicorn_config(app, config.server, log_level=config.logging.level.lower(),
                               access_log=config.logging.access_log)
    server = GracefulServer(uv_config, app.state.serving, drain_timeout_s=server_cfg.drain_timeout_s,
                            ready_message=ready_line(runtime.model_name, policy_in_force(runtime),
                                                     runtime.timings.get("warmup_s"), api_key is not None,
                                                     runtime.timings.get("resident_mb")))
    return run_server(server)


if __name__ == "__main__":
    sys.exit(main())
