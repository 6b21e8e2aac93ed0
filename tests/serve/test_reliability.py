"""Regression tests of the server under faults: no wedge, failures stay in their batch, /health
tells the truth, disconnects cancel work, one SIGTERM stops the server, Host allow-list, /docs offline."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from tests.serve.conftest import MODEL, patch_forward, wait_for, wait_until_up

from aigc.config import SampleConfig
from aigc.generate import Request
from aigc.models import load_run
from aigc.serve.scheduler import Scheduler


def test_scheduler_survives_a_batch_whose_every_job_was_cancelled(make_run):
    # The wedge: the only queued job is cancelled before the worker takes it, so the worker's batch is
    # empty. The old loop (`while batch := self._take_batch()`) ended there and every later request hung.
    run = load_run(make_run())
    scheduler = Scheduler(run.model, run.tokenizer, max_batch=4, max_queue=8)
    config = SampleConfig(max_new_tokens=3, temperature=0)

    async def scenario() -> str:
        gone = scheduler.submit([Request("bye", config=config)], want_events=True)
        gone.cancel()
        scheduler.start()
        await asyncio.sleep(0.2)  # the worker takes the cancelled job and must keep waiting for work
        job = scheduler.submit([Request("hello", config=config)], want_events=False)
        kind, _, _ = await asyncio.wait_for(job.next(), timeout=20)
        return kind

    try:
        assert asyncio.run(scenario()) == "done"
        assert scheduler.alive
    finally:
        assert scheduler.close(timeout=10)
    assert not scheduler.alive


def test_a_failing_decode_step_fails_only_its_batch(make_app, caplog):
    app = make_app()
    failing = {"on": True}

    def maybe_fail() -> None:
        if failing["on"]:
            raise RuntimeError("injected fault in a decode step")

    patch_forward(app.state.scheduler.model, maybe_fail)
    with TestClient(app) as client, caplog.at_level(logging.ERROR, logger="aigc.serve"):
        response = client.post("/v1/completions", json={"model": MODEL, "max_tokens": 4})
        assert response.status_code == 500
        assert response.json()["error"] == {
            "message": "internal error while decoding: RuntimeError",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        assert "injected fault" in caplog.text  # the traceback is logged on the server
        failing["on"] = False
        response = client.post("/v1/completions", json={"model": MODEL, "max_tokens": 4})
        assert response.status_code == 200, response.text
        assert client.get("/health").json()["status"] == "ok"


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the point
def test_health_is_degraded_when_the_decode_thread_is_gone(make_app):
    app = make_app()
    scheduler = app.state.scheduler

    def die():
        raise RuntimeError("worker thread killed by the test")

    scheduler._take_batch = die  # the worker calls it first thing: the thread ends with this error
    with TestClient(app) as client:
        wait_for(lambda: not scheduler.alive, 10, "the worker thread to end")
        response = client.get("/health")
    assert response.status_code == 503 and response.json()["status"] == "degraded"


def test_non_streaming_request_is_cancelled_when_its_client_disconnects(make_app, live_server):
    app = make_app(max_tokens_limit=8192)
    patch_forward(app.state.scheduler.model, lambda: time.sleep(0.005))  # 8192 tokens: over 40 s
    server = live_server(app)
    scheduler = app.state.scheduler
    body = b'{"model": "run", "max_tokens": 8192, "min_tokens": 8192}'
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as client:
        client.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_for(lambda: scheduler.running == 1, 20, "the request to be decoding")
    wait_for(lambda: scheduler.running == 0, 5, "the decode to stop once its client has gone")
    assert httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "max_tokens": 2}, timeout=30).is_success


@pytest.mark.parametrize(
    ("host", "api_key", "status"),
    [
        ("attacker.example", None, 403),  # DNS rebinding: a name that points at 127.0.0.1
        ("attacker.example:8000", None, 403),
        ("", None, 403),
        ("localhost:8000", None, 200),
        ("app.localhost", None, 200),
        ("127.0.0.1:8000", None, 200),
        ("127.1.2.3", None, 200),
        ("[::1]:8000", None, 200),
        ("LOCALHOST.", None, 200),
        ("my-box.lan:8000", None, 200),  # in --allowed-host
        ("attacker.example", "k3y", 200),  # with a key, the key protects the server
    ],
)
def test_without_api_key_only_loopback_and_allowed_hosts_are_served(make_app, host, api_key, status):
    app = make_app(allowed_hosts=("my-box.lan",), api_key=api_key)
    with TestClient(app, base_url="http://localhost") as client:
        headers = {"Host": host, "Authorization": "Bearer k3y"}
        for path in ("/health", "/v1/models"):
            response = client.get(path, headers=headers)
            assert response.status_code == status, (path, response.text)
    if status == 403:
        assert response.json()["error"]["code"] == "host_not_allowed"


def test_docs_pages_need_no_network_so_they_are_off(client):
    # FastAPI's /docs and /redoc pull their scripts from a CDN (blank offline); the schema stays.
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    assert client.get("/openapi.json").json()["info"]["title"] == "aigc"
    assert "cdn" not in client.get("/").text.lower()


def test_serve_cli_one_sigterm_stops_within_seconds_even_mid_stream(make_run, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "aigc", "serve", str(make_run()), "--port", str(port)]
    argv += ["--max-tokens-limit", "8192", "--shutdown-timeout", "1"]
    env = {k: v for k, v in os.environ.items() if k != "AIGC_API_KEY"}
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    body = {"model": "run", "max_tokens": 8192, "min_tokens": 8192, "stream": True}
    try:
        wait_until_up(url, server)
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            next(lines)  # a long stream is in flight, its client still reading
            server.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            received = drain_until_cut(lines)
        assert server.wait(15) == -signal.SIGTERM
        assert time.monotonic() - signalled < 8
    finally:
        if server.poll() is None:
            server.kill()
    assert received < 8192  # the stream did not run to its end first
    assert "Application shutdown complete" in log_path.read_text()


def drain_until_cut(lines) -> int:
    """Read server-sent events until the stream ends or the server cuts the connection; how many."""
    count = 0
    try:
        for line in lines:
            count += line.startswith("data: ")
    except httpx.RemoteProtocolError:  # the server closed the connection in the middle of the stream
        return count
    return count
