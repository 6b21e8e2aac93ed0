"""`aigc serve` from the command line: bad input is one line on stderr, Ctrl+C lets requests finish."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
import pytest
from tests.serve.conftest import wait_until_up

from aigc.cli import main


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--port", "70000"], "--port must be in [0, 65535]"),
        (["--max-batch", "0"], "--max-batch must be >= 1"),
        (["--max-tokens-limit", "9000"], "--max-tokens-limit must be in [1, 8192]"),
        (["--api-key", " "], "--api-key must not be blank"),
    ],
)
def test_serve_cli_bad_option_is_one_line_error(make_run, capsys, argv, fragment):
    assert main(["serve", str(make_run()), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("aigc serve: error:") and fragment in err and "\n" not in err


def test_serve_cli_missing_run_is_one_line_error(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "nowhere")]) == 2
    assert "run folder not found" in capsys.readouterr().err


def test_serve_cli_busy_port_is_one_line_error(make_run, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(make_run()), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "--port" in err


@pytest.mark.parametrize(
    ("stop", "exit_code"),
    [(signal.SIGINT, 0), (signal.SIGTERM, -signal.SIGTERM)],  # SIGTERM is re-raised once shut down, as usual
)
def test_serve_cli_signal_lets_in_flight_request_finish(make_run, tmp_path, stop, exit_code):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "AIGC_API_KEY": "from-env"}
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen(
        [sys.executable, "-m", "aigc", "serve", str(make_run()), "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": "Bearer from-env"}
    try:
        wait_until_up(url, server)
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the key came from AIGC_API_KEY
        body = {"model": "run", "max_tokens": 100, "min_tokens": 100, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=headers, timeout=120) as response:
            lines = response.iter_lines()
            first = next(lines)  # the request is in flight
            server.send_signal(stop)
            events = [first, *(line for line in lines if line.startswith("data: "))]
        assert server.wait(60) == exit_code
    finally:
        if server.poll() is None:
            server.kill()
    assert events[-1] == "data: [DONE]"
    assert len(events) == 1 + 99 + 1 + 1  # the first token, the other 99, the finish chunk, [DONE]
    log.seek(0)
    output = log.read()
    assert "playground http://127.0.0.1" in output and "Application shutdown complete" in output
    if stop == signal.SIGINT:
        assert "stopped; requests in flight were finished" in output
