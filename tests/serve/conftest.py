"""Fixtures and helpers for the server tests: an app over a random tiny run, in-process or on a real
socket; waiting for a condition or a server process; slowing or failing a model's forward pass."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from aigc.config import ServeConfig
from aigc.models import load_run
from aigc.serve import create_app

MODEL = "run"  # make_run's folder name, which the server uses as the model id
KEY = "test-key"


def wait_for(condition: Callable[[], bool], timeout: float = 30.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for: {what}"
        time.sleep(0.005)


def wait_until_up(url: str, server: subprocess.Popen) -> None:
    """Wait for an `aigc serve` process to answer /health (it must not exit meanwhile)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert server.poll() is None, "server exited early"
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.1)
    raise AssertionError("server did not come up")


def patch_forward(model, before: Callable[[], None]) -> None:
    """Call `before()` ahead of every forward pass of `model` (to slow it down or make it fail)."""
    forward = model.forward

    def patched(*args, **kwargs):
        before()
        return forward(*args, **kwargs)

    model.forward = patched  # nn.Module.__call__ looks the instance attribute up first


@pytest.fixture
def make_app(make_chat_run) -> Callable[..., FastAPI]:
    """Factory: the app over a fresh tiny run (`kind` gpt or lstm) that has a chat template, with
    ServeConfig overrides."""

    def _make(kind: str = "gpt", **options) -> FastAPI:
        # TestClient sends `Host: testserver`, which a server without an API key does not serve by default.
        options = {"allowed_hosts": ("testserver",), **options}
        return create_app(load_run(make_chat_run(kind=kind)), ServeConfig(**options))

    return _make


@pytest.fixture
def client(make_app) -> Iterator[TestClient]:
    with TestClient(make_app()) as test_client:
        yield test_client


class LiveServer:
    """uvicorn serving an app on a free 127.0.0.1 port, in a thread of this process."""

    def __init__(self, app: FastAPI):
        self.app = app
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive(), "server did not shut down"


@pytest.fixture
def live_server(make_app) -> Iterator[Callable[..., LiveServer]]:
    """Factory: start a real server for `app` (default: make_app with these ServeConfig overrides);
    stopped after the test."""
    servers: list[LiveServer] = []

    def _start(app: FastAPI | None = None, **options) -> LiveServer:
        servers.append(LiveServer(app or make_app(**options)))
        return servers[-1]

    yield _start
    for server in servers:
        server.stop()
