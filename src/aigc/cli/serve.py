"""`aigc serve RUN`: an OpenAI-compatible HTTP API and a web playground over one trained run."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from aigc.cli.args import add_dataclass_args, given_options
from aigc.config import ServeConfig
from aigc.errors import AigcError

API_KEY_ENV = "AIGC_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve a run over an OpenAI-compatible HTTP API, with a web playground",
        description=(
            "Load RUN once and serve POST /v1/completions and POST /v1/chat/completions (OpenAI's schemas, "
            "streaming included; chat needs a run with a chat template), GET /v1/models, GET /v1/run, "
            "GET /health, and a playground page at /. "
            "Concurrent requests are decoded together in batches. Ctrl+C stops it after the "
            "requests in flight have finished."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("run", help="run folder made by `aigc train`")
    add_dataclass_args(parser, ServeConfig)
    parser.set_defaults(handler=handle, handles_sigterm=True)


def handle(args: argparse.Namespace) -> int:
    options = given_options(args, ServeConfig)
    if options.get("api_key") is None and os.environ.get(API_KEY_ENV):
        options["api_key"] = os.environ[API_KEY_ENV]
    config = ServeConfig(**options)

    # Deferred: a slow import that only this path needs.
    import uvicorn

    from aigc.artifacts.device import pick_device
    from aigc.models import describe_run, load_run
    from aigc.serve import create_app

    run = load_run(args.run, device=pick_device(config.device))
    app = create_app(run, config)
    sock = _bind(config.host, config.port)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(
        f"aigc serve: serving {run.path} ({describe_run(run.config, run.model).line()}) as model "
        f"{config.model_name or run.path.name!r}",
        file=sys.stderr,
    )
    print(
        f"aigc serve: playground http://{shown}:{port}/  API http://{shown}:{port}/v1  "
        f"(auth {'on' if config.api_key else 'off'}; Ctrl+C to stop)",
        file=sys.stderr,
    )
    if not config.api_key and host not in ("127.0.0.1", "::1", "localhost"):
        print(
            f"aigc serve: warning: listening on {host} without an API key; set --api-key or {API_KEY_ENV} "
            "(meanwhile only loopback Host names, --host and --allowed-host values are answered)",
            file=sys.stderr,
        )
    # After Ctrl+C / SIGTERM, requests in flight get shutdown_timeout seconds; then they are cancelled.
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=config.shutdown_timeout))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl+C once it has shut down gracefully
        print("aigc serve: stopped; requests in flight were finished", file=sys.stderr)
    return 0


def _bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket here, so a busy port is a one-line error rather than a log trace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise AigcError(f"cannot listen on {host}:{port} ({exc.strerror}); pass another --port or --host") from exc
    return sock
