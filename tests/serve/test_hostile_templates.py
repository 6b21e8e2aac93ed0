"""A run's chat template cannot freeze the server: a template that loops past its time limit is answered
with a 400 naming the limit while /health and other requests keep being answered, and SIGTERM still
stops the server within seconds. A template that fails is a 400, never a 500."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from test_cli import wait_until_up  # the same start-up wait as the serve CLI tests

from aigc.config import ServeConfig
from aigc.models import load_run
from aigc.serve import create_app

# 10**8 loop steps: minutes of rendering without a time limit, no output and no memory to speak of.
SLOW = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
CHAT = {"model": "run", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{{ 1//0 }}", "ZeroDivisionError"),
        ("{{ 'x' * 10**9 }}", "the limit is"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses too deeply"),
    ],
)
def test_a_failing_template_is_a_400_with_one_line(make_chat_run, template, fragment):
    run_dir = make_chat_run()
    (run_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    app = create_app(load_run(run_dir), ServeConfig(allowed_hosts=("testserver",), model_name="run"))
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
        assert response.status_code == 400, response.text
        message = response.json()["error"]["message"]
        assert fragment in message and "\n" not in message
        assert client.post("/v1/completions", json={"model": "run", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_a_slow_template_neither_blocks_health_nor_sigterm(make_chat_run, tmp_path):
    run_dir = make_chat_run()
    (run_dir / "chat_template.jinja").write_text(SLOW, encoding="utf-8")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [sys.executable, "-m", "aigc", "serve", str(run_dir), "--port", str(port), "--model-name", "run"]
    env = {k: v for k, v in os.environ.items() if k != "AIGC_API_KEY"}
    with (tmp_path / "server.log").open("w") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    answers: list[httpx.Response] = []

    def chat() -> None:
        answers.append(httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=60))

    try:
        wait_until_up(url, server)
        first = threading.Thread(target=chat)
        first.start()
        time.sleep(0.5)  # the template is rendering now
        assert httpx.get(f"{url}/health", timeout=1.5).status_code == 200
        first.join(30)
        assert answers[0].status_code == 400 and "takes more than" in answers[0].json()["error"]["message"]
        second = threading.Thread(target=chat)
        second.start()
        time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert server.wait(15) == -signal.SIGTERM
        assert time.monotonic() - signalled < 8
        second.join(30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
