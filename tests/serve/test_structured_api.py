"""Structured output over HTTP: `response_format` on both routes, `tools` / `tool_choice` in chat (plain,
streamed, and through the official `openai` client on a live server), and schemas that fail closed."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from pydantic import BaseModel, Field

from aigc.chat import ChatTemplate, Message, encode_chat
from aigc.config import ServeConfig
from aigc.models import load_run
from aigc.serve import create_app
from aigc.tools import fallback_messages, parse_tools

pytestmark = pytest.mark.usefixtures("one_thread")

REVIEW = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["pos", "neg"]}, "reason": {"type": "string", "maxLength": 10}},
    "required": ["sentiment", "reason"],
    "additionalProperties": False,
}
ORDER = {
    "type": "object",
    "properties": {"order_id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"}},
    "required": ["order_id"],
    "additionalProperties": False,
}
TOOLS = [{"type": "function", "function": {"name": "lookup_order", "description": "An order.", "parameters": ORDER}}]
ASK = [{"role": "user", "content": "Where is my order AB123?"}]


@pytest.fixture
def app(make_chat_run):
    """A tiny random run with room in its context for tool definitions."""
    return create_app(load_run(make_chat_run(block_size=1024)), ServeConfig(allowed_hosts=("testserver",)))


@pytest.fixture
def client(app):
    with TestClient(app) as test_client:
        yield test_client


def chat(client, **fields):
    body = {"model": "run", "messages": ASK, "max_tokens": 120, "seed": 1, **fields}
    return client.post("/v1/chat/completions", json=body)


def schema_format(schema, name="review"):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_chat_response_format_json_schema_validates(client):
    response = chat(client, response_format=schema_format(REVIEW), n=3)
    assert response.status_code == 200, response.text
    for choice in response.json()["choices"]:
        assert choice["finish_reason"] == "stop" and choice["json_complete"] is True
        jsonschema.validate(json.loads(choice["message"]["content"]), REVIEW)


def test_completions_response_format_json_object_and_free_prompts_in_one_batch(client):
    body = {"model": "run", "prompt": ["a", "b"], "max_tokens": 40, "seed": 2, "temperature": 0}
    free = client.post("/v1/completions", json=body).json()
    constrained = client.post("/v1/completions", json={**body, "response_format": {"type": "json_object"}}).json()
    assert all(c["text"].startswith("{") for c in constrained["choices"])
    assert all(c.get("json_complete") is None for c in free["choices"])
    for choice in constrained["choices"]:
        if choice["json_complete"]:
            assert isinstance(json.loads(choice["text"]), dict)


def test_length_limit_inside_the_json_says_it_is_incomplete(client):
    choice = chat(client, response_format=schema_format(REVIEW), max_tokens=3).json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["json_complete"] is False
    assert "incomplete" in choice["warning"]


def test_streamed_choices_say_whether_their_json_closed(client):
    body = {"model": "run", "prompt": "a", "max_tokens": 3, "seed": 2, "stream": True}
    with client.stream("POST", "/v1/completions", json={**body, "response_format": {"type": "json_object"}}) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    closing = json.loads(lines[-2])["choices"][0]
    assert closing["finish_reason"] == "length" and closing["json_complete"] is False and closing["warning"]
    fields = {**_body(), "response_format": schema_format(REVIEW), "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=fields) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert json.loads(lines[-2])["choices"][0]["json_complete"] is True


@pytest.mark.parametrize(
    ("fields", "param", "named"),
    [
        ({"response_format": schema_format({"type": "array", "uniqueItems": True})}, "response_format", "uniqueItems"),
        ({"response_format": schema_format({"type": "string", "pattern": "(ab"})}, "response_format", "unclosed"),
        ({"response_format": {"type": "yaml"}}, "response_format", "json_schema"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}}, "tool_choice", "'x'"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"not": {}}}}]}, "tools", "not"),
    ],
)
def test_what_cannot_be_enforced_is_a_400_naming_it(client, fields, param, named):
    response = chat(client, **fields)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and named in error["message"]


def test_required_tool_choice_replies_with_a_valid_call(client):
    result = chat(client, tools=TOOLS, tool_choice="required", n=2).json()
    for choice in result["choices"]:
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        (call,) = choice["message"]["tool_calls"]
        assert call["id"].startswith("call_") and call["function"]["name"] == "lookup_order"
        jsonschema.validate(json.loads(call["function"]["arguments"]), ORDER)


def test_auto_tool_choice_is_either_a_valid_call_or_text_that_is_no_call(client):
    choices = chat(client, tools=TOOLS, n=8, max_tokens=60).json()["choices"]
    for choice in choices:
        message = choice["message"]
        if choice["finish_reason"] == "tool_calls":
            jsonschema.validate(json.loads(message["tool_calls"][0]["function"]["arguments"]), ORDER)
        else:  # free text may not start like a call, so a reply is never a broken call
            assert message.get("tool_calls") is None and not message["content"].lstrip().startswith("{")


def test_auto_tool_choice_with_a_response_format_is_a_call_or_that_json(client):
    choices = chat(client, tools=TOOLS, response_format=schema_format(REVIEW), n=6).json()["choices"]
    for choice in choices:
        message = choice["message"]
        if choice["finish_reason"] == "tool_calls":
            jsonschema.validate(json.loads(message["tool_calls"][0]["function"]["arguments"]), ORDER)
        else:
            jsonschema.validate(json.loads(message["content"]), REVIEW)


def test_tool_calls_stream_as_openai_streams_them(client):
    plain = chat(client, tools=TOOLS, tool_choice="required").json()["choices"][0]["message"]["tool_calls"][0]
    with client.stream("POST", "/v1/chat/completions", json={**_body(), "tools": TOOLS, "stream": True,
                                                              "tool_choice": "required"}) as response:  # fmt: skip
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line) for line in lines[:-1]]
    assert lines[-1] == "[DONE]"
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["function"]["name"] == "lookup_order" and calls[0]["id"].startswith("call_")
    assert "".join(c["function"]["arguments"] for c in calls) == plain["function"]["arguments"]
    assert len(calls) > 2  # the arguments arrive in pieces, not at the end
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def _body():
    return {"model": "run", "messages": ASK, "max_tokens": 120, "seed": 1}


def test_tool_results_are_accepted_back_in_the_conversation(client):
    function = {"name": "lookup_order", "arguments": '{"order_id": "AB123"}'}
    call = {"id": "call_1", "type": "function", "function": function}
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
    ]
    response = chat(client, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=5)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] is not None


def test_tools_reach_templates_that_know_them_and_fall_back_to_text_otherwise(tiny_tokenizer):
    tools = parse_tools(TOOLS)
    knows = ChatTemplate(
        "{{ tools | tojson }}{% for m in messages %}{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}"
        "{% endfor %}"
    )
    call = {"id": "c", "name": "lookup_order", "arguments": {"order_id": "AB123"}}
    messages = [Message("user", "hi"), Message("assistant", "", (call,)), Message("tool", "shipped", (), "c")]
    text = encode_chat(knows, tiny_tokenizer, messages, context=None, tools=[t.to_json() for t in tools]).text
    assert '"name": "lookup_order"' in text and '"arguments": {"order_id": "AB123"}' in text
    fallback = fallback_messages(messages, tools)
    assert fallback[0].role == "system" and "lookup_order" in fallback[0].content
    assert fallback[2] == Message("assistant", '{"name": "lookup_order", "arguments": {"order_id": "AB123"}}')
    assert fallback[3] == Message("user", "Result of the tool call: shipped")


class Review(BaseModel):
    sentiment: Literal["pos", "neg"]
    reason: str = Field(max_length=10)  # bounded: a random model would otherwise write until the limit


def test_openai_client_parse_and_tool_calls_against_a_live_server(app, live_server):
    server = live_server(app)
    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    parsed = client.chat.completions.parse(model="run", messages=ASK, response_format=Review, max_tokens=150, seed=3)
    assert isinstance(parsed.choices[0].message.parsed, Review)
    called = client.chat.completions.create(model="run", messages=ASK, tools=TOOLS, tool_choice="required", seed=1)
    (call,) = called.choices[0].message.tool_calls
    jsonschema.validate(json.loads(call.function.arguments), ORDER)
    answer = client.chat.completions.create(
        model="run",
        messages=[*ASK, called.choices[0].message, {"role": "tool", "tool_call_id": call.id, "content": "shipped"}],
        tools=TOOLS,
        max_tokens=5,
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
