"""`POST /v1/chat/completions`: OpenAI's chat schema over the run's chat template, in process and called
by the official `openai` client on a live server (plain and streaming), errors always a 400 in
OpenAI's shape."""

from __future__ import annotations

import json

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from tests.serve.conftest import KEY

from aigc.chat import encode_chat, load_chat_template, parse_messages
from aigc.config import SampleConfig, ServeConfig
from aigc.generate import Request, generate
from aigc.models import load_run
from aigc.serve import create_app

pytestmark = pytest.mark.usefixtures("one_thread")
MESSAGES = [
    {"role": "system", "content": "You write film reviews."},
    {"role": "user", "content": [{"type": "text", "text": "a wonderful film"}]},
]


def test_chat_completion_is_the_template_rendered_and_decoded(client):
    body = {"model": "run", "messages": MESSAGES, "max_tokens": 6, "seed": 3, "n": 2, "temperature": 0.8}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["object"] == "chat.completion" and len(result["choices"]) == 2
    choice = result["choices"][1]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    # Choice j is seeded with seed + j, so it is the one choice of a request with that seed.
    alone = client.post("/v1/chat/completions", json={**body, "n": 1, "seed": 4}).json()
    assert alone["choices"][0]["message"] == choice["message"]


def test_chat_matches_a_direct_decode_of_the_rendered_prompt(make_chat_run):
    run = load_run(make_chat_run())
    with TestClient(create_app(run, ServeConfig(allowed_hosts=("testserver",)))) as client:
        body = {"model": "run", "messages": MESSAGES, "max_completion_tokens": 8, "seed": 5, "logprobs": True}
        result = client.post("/v1/chat/completions", json={**body, "top_logprobs": 2}).json()
    prompt = encode_chat(load_chat_template(run.path), run.tokenizer, parse_messages(MESSAGES), context=64)
    request = Request(
        prompt_ids=prompt.ids, stop_ids=prompt.stop_ids, config=SampleConfig(max_new_tokens=8, seed=5, temperature=1.0)
    )
    expected = generate(run.model, run.tokenizer, [request])[0]
    choice = result["choices"][0]
    assert choice["message"]["content"] == expected.text
    assert result["usage"]["prompt_tokens"] == len(prompt.ids)
    content = choice["logprobs"]["content"]
    assert len(content) == len(expected.token_ids) and all(len(t["top_logprobs"]) == 2 for t in content)
    assert all(t["logprob"] <= t["top_logprobs"][0]["logprob"] + 1e-6 for t in content)


def test_streaming_sends_role_deltas_finish_and_usage(client):
    body = {"model": "run", "messages": MESSAGES, "max_tokens": 5, "seed": 1, "n": 2, "stream": True}
    plain = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    texts, finish = {0: "", 1: ""}, {}
    for c in chunks:
        for choice in c["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            finish[choice["index"]] = choice["finish_reason"] or finish.get(choice["index"])
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in plain["choices"]]
    assert finish == {c["index"]: c["finish_reason"] for c in plain["choices"]}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]


@pytest.mark.parametrize(
    "change, status, message",
    [
        ({"messages": []}, 400, "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "role must be one of system, user, assistant"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "is not text"),
        ({"messages": [{"role": "user", "content": "film " * 200}]}, 400, "tokens too many"),
        ({"max_tokens": 60}, 400, "tokens too many"),
        ({"max_tokens": 0}, 400, "max_tokens must be in"),
        ({"temperature": -1}, 400, "temperature must be"),
        ({"top_logprobs": 3}, 400, "top_logprobs needs logprobs"),
        ({"n": 0}, 400, "n must be in"),
        ({"tools": [{"type": "function"}]}, 400, "tools[0] must be"),
        ({"model": "gpt-4o"}, 404, "not found"),
        ({"messages": "hi"}, 400, "messages"),
    ],
)
def test_bad_chat_requests_are_openai_shaped_errors(client, change, status, message):
    body = {"model": "run", "messages": [{"role": "user", "content": "hi"}], **change}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"]["message"]


@pytest.mark.parametrize(
    "change, param, fragment",
    [
        ({"messages": [{"role": "user", "content": "hi\ud800"}]}, "messages", "messages[0].content must be valid"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udce9"}]}]}, "messages", "\\udce9"),
        ({"stop": ["\udfff"]}, "stop", "stop must be valid UTF-8 text; character 0 is \\udfff (a lone surrogate)"),
    ],
)
def test_lone_surrogates_in_a_chat_request_are_400_naming_the_field(client, change, param, fragment):
    # json.dumps escapes them as `\ud800`, the way a JSON client may send them; the messages were a 500.
    body = json.dumps({"model": "run", "messages": [{"role": "user", "content": "hi"}], **change})
    response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert fragment in error["message"] and "must be valid UTF-8 text" in error["message"]


def test_a_run_without_template_answers_400_saying_how(make_run):
    app = create_app(load_run(make_run()), ServeConfig(allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        body = {"model": "run", "messages": [{"role": "user", "content": "hi"}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 400
        assert "--chat-template FILE" in response.json()["error"]["message"]
        assert client.post("/v1/completions", json={"model": "run", "prompt": "a", "max_tokens": 2}).status_code == 200


def test_openai_client_chat_plain_and_streaming(live_server):
    server = live_server(api_key=KEY)
    client = OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)
    result = client.chat.completions.create(
        model="run", messages=MESSAGES, max_tokens=8, temperature=0.7, top_p=0.9, seed=4, n=2, stop=["never"]
    )
    assert len(result.choices) == 2 and result.choices[0].message.role == "assistant"
    assert result.usage.prompt_tokens > 0 and all(c.finish_reason in ("stop", "length") for c in result.choices)
    stream = client.chat.completions.create(
        model="run",
        messages=MESSAGES,
        max_completion_tokens=8,
        temperature=0.7,
        top_p=0.9,
        seed=4,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        logprobs=True,
        top_logprobs=1,
    )
    texts, usage, logprobs = {0: "", 1: ""}, None, 0
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            logprobs += len(choice.logprobs.content) if choice.logprobs and choice.logprobs.content else 0
        usage = chunk.usage or usage
    assert [texts[0], texts[1]] == [c.message.content for c in result.choices]
    assert usage.completion_tokens == result.usage.completion_tokens == logprobs
    with pytest.raises(openai.BadRequestError, match="role must be one of"):
        client.chat.completions.create(model="run", messages=[{"role": "robot", "content": "x"}])
