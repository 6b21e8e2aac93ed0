"""Fixtures shared by the CLI tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def terminal():
    """Open interactive `aigc chat` sessions in pseudo-terminals; each is killed if still running."""
    from test_chat_cli import Terminal  # the driver lives with the interactive chat tests it serves

    terminals: list[Terminal] = []

    def _open(*args: str) -> Terminal:
        terminals.append(Terminal(*args))
        return terminals[-1]

    yield _open
    for term in terminals:
        if term.proc.poll() is None:
            term.proc.kill()
            term.proc.wait()
