"""A real uvicorn server on a free 127.0.0.1 port, called by the official `openai` client and httpx."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from openai import OpenAI
from tests.serve.conftest import KEY, wait_for


def test_openai_client_completions_and_streaming(live_server):
    server = live_server(api_key=KEY)
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["run"]

    result = client.completions.create(
        model="run",
        prompt="a wonderful film",
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        seed=4,
        n=2,
        logprobs=2,
        stop=["never"],
        extra_body={"label": "pos", "min_tokens": 8},
    )
    assert len(result.choices) == 2 and result.usage.completion_tokens == 16
    assert all(c.finish_reason == "length" and len(c.logprobs.tokens) == 8 for c in result.choices)

    stream = client.completions.create(
        model="run",
        prompt="a wonderful film",
        max_tokens=8,
        temperature=0.7,
        top_p=0.9,
        seed=4,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"label": "pos", "min_tokens": 8},
    )
    texts, usage = {0: "", 1: ""}, None
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [c.text for c in result.choices]
    assert usage.completion_tokens == 16


def test_openai_client_sees_errors_as_exceptions(live_server):
    server = live_server(api_key=KEY)
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="x")
    with pytest.raises(openai.BadRequestError, match=r"temperature must be 0 \(greedy\) or in"):
        client.completions.create(model="run", prompt="x", temperature=-1)


def test_concurrent_requests_share_batches(live_server):
    server = live_server(max_batch=16)
    scheduler = server.app.state.scheduler

    def call(i: int) -> int:
        body = {"model": "run", "prompt": f"review {i}", "max_tokens": 20, "min_tokens": 20, "seed": i}
        response = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return response.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(16) as pool:
        tokens = list(pool.map(call, range(32)))
    assert tokens == [20] * 32
    # 32 requests fit in far fewer than 32 decode batches once they overlap.
    assert scheduler.largest_batch > 1 and scheduler.batches < 32


def test_full_queue_answers_429(live_server):
    server = live_server(max_batch=1, max_queue=1, max_tokens_limit=8192)
    scheduler = server.app.state.scheduler
    # Long enough to hold the only batch slot for seconds; hanging up below ends it early.
    long = {"model": "run", "max_tokens": 8192, "min_tokens": 8192, "stream": True}
    results: dict[str, int] = {}

    def post_small() -> None:
        body = {"model": "run", "max_tokens": 2}
        results["queued"] = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).status_code

    with httpx.stream("POST", f"{server.url}/v1/completions", json=long, timeout=60) as running:
        lines = running.iter_lines()  # kept: dropping the iterator would close the connection
        next(lines)  # decoding now, and it fills the only batch slot
        queued = threading.Thread(target=post_small)
        queued.start()
        wait_for(lambda: scheduler.queued == 1)
        refused = httpx.post(f"{server.url}/v1/completions", json={"model": "run", "max_tokens": 2}, timeout=30)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert refused.json()["error"]["type"] == "rate_limit_error"
    queued.join(120)  # hanging up on the long stream ended its batch, so the queued one runs
    assert results == {"queued": 200}


def test_client_leaving_a_stream_frees_the_worker(live_server):
    server = live_server(max_batch=4)
    scheduler = server.app.state.scheduler
    body = {"model": "run", "max_tokens": 1024, "min_tokens": 1024, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as response:
        next(response.iter_lines())  # the first token arrived, then the client hangs up
    wait_for(lambda: scheduler.running == 0)
    ok = httpx.post(f"{server.url}/v1/completions", json={"model": "run", "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200
