"""Command-line entry point `aigc`: the only place that prints for humans or exits.

Each sub-command lives in its own module here with `register(subparsers)`; its handler returns an
exit code. A user error (`AigcError`) becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys

from aigc import __version__
from aigc.errors import AigcError
from aigc.fsutil import Terminated, sigterm_raises, write_refused

# Module names under aigc.cli, in the order `aigc --help` lists them.
COMMANDS = (
    "prepare",
    "train",
    "plot",
    "generate",
    "chat",
    "batch",
    "eval",
    "demo",
    "serve",
    "export",
    "import_",
    "merge",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aigc",
        description="Local-first text generation: prepare → train → generate → eval → serve.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"aigc {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"aigc.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except AigcError as exc:  # a text option that is not valid UTF-8 (`aigc.cli.args.text`)
        print(f"aigc: error: {exc}", file=sys.stderr)
        return 2
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    # SIGTERM unwinds through `finally` (temporary files are removed), except for a command that stops
    # on it by itself (`aigc serve`: uvicorn lets in-flight requests finish, then re-raises the signal).
    on_sigterm = contextlib.nullcontext() if getattr(args, "handles_sigterm", False) else sigterm_raises()
    try:
        with on_sigterm:
            return int(args.handler(args) or 0)
    except AigcError as exc:
        print(f"aigc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"aigc {args.command}: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print(f"aigc {args.command}: terminated (SIGTERM); temporary files removed", file=sys.stderr)
        return 128 + signal.SIGTERM
    except OSError as exc:
        reason = write_refused(exc)  # a write outside fsutil's atomic ones (shards, logs) ran out of room
        if reason is None:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"aigc {args.command}: error: a write failed{where}: {reason} and run again", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
