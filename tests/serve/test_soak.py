"""Soak of the scheduler through a live server: concurrent clients, a third of which hang up at a random
moment (queued, prefilling or decoding; streaming or not). Every surviving request completes, nothing
hangs, and the queue, the running count and the thread count return to their baseline."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from tests.serve.conftest import patch_forward, wait_for

CLIENTS, REQUESTS = 12, 60


def call(port: int, body: dict, hang_up_after: float | None) -> int | None:
    """Send one completion over a raw socket; hang up after `hang_up_after` s, or read the whole answer
    and return the number of generated tokens it reports."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        if hang_up_after is not None:
            time.sleep(hang_up_after)
            return None
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer[:300]
    if body.get("stream"):
        assert b"data: [DONE]" in payload, payload[-300:]  # (chunked transfer encoding around the events)
        return payload.count(b'"finish_reason": null')
    return json.loads(payload)["usage"]["completion_tokens"]


def test_scheduler_soak_with_random_disconnects(make_app, live_server):
    app = make_app(max_batch=4, max_queue=256)
    patch_forward(app.state.scheduler.model, lambda: time.sleep(0.002))  # prefill and steps take real time
    server = live_server(app)
    scheduler, port = app.state.scheduler, int(server.url.rsplit(":", 1)[1])
    baseline = threading.active_count()
    rng = random.Random(14)
    plans = []
    for i in range(REQUESTS):
        tokens = rng.randint(1, 40)
        body = {
            "model": "run",
            "prompt": f"review {i}",
            "max_tokens": tokens,
            "min_tokens": tokens,
            "stream": rng.random() < 0.5,
            "seed": i,
        }
        plans.append((body, rng.uniform(0.0, 0.3) if rng.random() < 1 / 3 else None))
    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(lambda plan: call(port, *plan), plans))
    for (body, hang_up), result in zip(plans, results):
        if hang_up is None:
            assert result == body["max_tokens"], body
    wait_for(lambda: scheduler.queued == 0 and scheduler.running == 0, 20, "the scheduler to drain")
    wait_for(lambda: threading.active_count() <= baseline, 10, "threads to return to the baseline")
    assert scheduler.alive
    survivors = sum(hang_up is None for _, hang_up in plans)
    print(
        f"soak: {REQUESTS} requests, {REQUESTS - survivors} hung up, {survivors} completed, "
        f"{time.monotonic() - started:.1f} s, {scheduler.batches} batches"
    )
