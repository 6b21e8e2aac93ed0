"""The HTTP API in-process (FastAPI TestClient): schema, sampling options, streaming, errors."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
from fastapi.testclient import TestClient
from tests.serve.conftest import MODEL

from aigc.config import SampleConfig, ServeConfig
from aigc.fsutil import append_jsonl
from aigc.generate import Request, generate
from aigc.models import load_run
from aigc.serve import create_app


def complete(client: TestClient, **fields) -> dict:
    response = client.post("/v1/completions", json={"model": MODEL, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def stream_events(client: TestClient, **fields) -> list[str]:
    """The `data:` payloads of a streamed completion, in order."""
    with client.stream("POST", "/v1/completions", json={"model": MODEL, "stream": True, **fields}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        body = "".join(response.iter_text())
    return [line[len("data: ") :] for line in body.split("\n\n") if line.startswith("data: ")]


def test_completions_returns_openai_shape_with_usage(client):
    body = complete(client, prompt="a wonderful film", max_tokens=6, min_tokens=6, seed=3)
    assert body["object"] == "text_completion" and body["model"] == MODEL and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"]["completion_tokens"] == 6
    # <|endoftext|> starts every context, then the prompt's tokens.
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert prompt_tokens >= 2 and body["usage"]["total_tokens"] == prompt_tokens + 6


def test_completions_seed_reproduces_text_and_n_choices_differ(client):
    first = complete(client, prompt="I loved", max_tokens=12, min_tokens=12, seed=7, n=3)
    again = complete(client, prompt="I loved", max_tokens=12, min_tokens=12, seed=7, n=3)
    texts = [c["text"] for c in first["choices"]]
    assert texts == [c["text"] for c in again["choices"]]
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert len(set(texts)) > 1  # choice j samples with seed + j
    assert first["usage"]["completion_tokens"] == 36


def test_completions_prompt_list_orders_choices_prompt_major(client):
    body = complete(client, prompt=["one", "two"], n=2, max_tokens=3, min_tokens=3, temperature=0)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    single = complete(client, prompt="two", max_tokens=3, min_tokens=3, temperature=0)
    assert body["choices"][2]["text"] == body["choices"][3]["text"] == single["choices"][0]["text"]


def test_completions_logprobs_follow_openai_shape(client):
    prompt = "the music"
    body = complete(client, prompt=prompt, max_tokens=8, min_tokens=8, seed=1, logprobs=3)
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == 8
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"][0] == len(prompt)
    assert all(
        b - a == len(t) for a, b, t in zip(logprobs["text_offset"], logprobs["text_offset"][1:], logprobs["tokens"])
    )
    assert all(lp <= 0 for lp in logprobs["token_logprobs"])
    assert all(1 <= len(top) <= 3 and all(v <= 0 for v in top.values()) for top in logprobs["top_logprobs"])
    # Greedy picks the most likely token, so its logprob equals the best alternative's.
    greedy = complete(client, prompt=prompt, max_tokens=4, temperature=0, logprobs=1)["choices"][0]["logprobs"]
    for chosen, top in zip(greedy["token_logprobs"], greedy["top_logprobs"]):
        assert math.isclose(chosen, max(top.values()), rel_tol=1e-4)


def test_completions_logprobs_zero_gives_chosen_token_only(client):
    logprobs = complete(client, max_tokens=3, min_tokens=3, logprobs=0)["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == 3 and logprobs["top_logprobs"] == [{}, {}, {}]


def test_completions_stream_matches_non_stream(client):
    fields = dict(prompt="one of the best", max_tokens=10, min_tokens=10, seed=11, n=2)
    events = stream_events(client, stream_options={"include_usage": True}, **fields)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = {0: "", 1: ""}
    finish = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        text[choice["index"]] += choice["text"]
        if choice["finish_reason"]:
            finish[choice["index"]] = choice["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20
    full = complete(client, **fields)
    assert [text[0], text[1]] == [c["text"] for c in full["choices"]]
    assert finish == {0: "length", 1: "length"}


def test_completions_stream_carries_per_token_logprobs(client):
    events = stream_events(client, max_tokens=5, min_tokens=5, logprobs=2, seed=2)
    token_chunks = [json.loads(e)["choices"][0] for e in events[:-1]]
    token_chunks = [c for c in token_chunks if c["finish_reason"] is None]
    assert len(token_chunks) == 5
    assert all(len(c["logprobs"]["tokens"]) == 1 and c["logprobs"]["tokens"][0] == c["text"] for c in token_chunks)


def test_completions_stop_string_is_excluded(client):
    free = complete(client, prompt="a", max_tokens=30, min_tokens=30, seed=5)["choices"][0]["text"]
    stop = free[8:10]
    assert stop.strip(), "need a non-blank stop string from the sampled text"
    body = complete(client, prompt="a", max_tokens=30, min_tokens=30, seed=5, stop=[stop, "never-appears"])
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == free[: free.find(stop)]


def test_completions_label_extension_conditions_on_a_label(client):
    with_label = complete(client, max_tokens=1, label="pos", temperature=0, logprobs=0)
    without = complete(client, max_tokens=1, temperature=0, logprobs=0)
    # The control token is one more prompt token, and it changes the model's next-token distribution.
    assert with_label["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"] + 1
    assert with_label["choices"][0]["logprobs"] != without["choices"][0]["logprobs"]


def test_completions_guidance_extension_matches_the_library(make_chat_run):
    run = load_run(make_chat_run())
    fields = dict(prompt="the film", label="pos", negative_label="neg", guidance_scale=3.0)
    config = SampleConfig(temperature=0.0, max_new_tokens=8, min_new_tokens=8, guidance_scale=3.0)
    request = Request(prompt="the film", label="pos", negative_label="neg", config=config)
    (expected,) = generate(run.model, run.tokenizer, [request])
    (unguided,) = generate(
        run.model, run.tokenizer, [replace(request, negative_label=None, config=replace(config, guidance_scale=1.0))]
    )
    assert expected.text != unguided.text  # guidance moved this greedy text, so the comparison below means something
    app = create_app(run, ServeConfig(allowed_hosts=("testserver",)))
    with TestClient(app) as client:
        body = complete(client, max_tokens=8, min_tokens=8, temperature=0, **fields)
    assert body["choices"][0]["text"] == expected.text


def test_completions_lstm_run_is_served(make_app):
    with TestClient(make_app(kind="lstm")) as client:
        body = complete(client, prompt="great", max_tokens=4, min_tokens=4, n=2, seed=0)
    assert [len(c["text"]) > 0 for c in body["choices"]] == [True, True]


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"temperature": -0.5}, "temperature", "temperature must be 0 (greedy) or in"),
        ({"top_p": 0}, "top_p", "top_p must be in [1e-06, 1]"),
        ({"top_p": 1e-46}, "top_p", "top_p must be in [1e-06, 1]"),
        ({"temperature": 1e39}, "temperature", "temperature must be 0 (greedy) or in [0.001, 100]"),
        ({"temperature": 1e-39}, "temperature", "temperature must be 0 (greedy) or in [0.001, 100]"),
        ({"repetition_penalty": 1e39}, "repetition_penalty", "repetition_penalty must be in [1, 100]"),
        ({"stop": ["a"] * 17}, "stop", "stop may be given at most 16 times"),
        ({"stop": ["x" * 4000] * 2}, "stop", "stop strings may hold at most 4096 characters in all"),
        ({"top_k": -1}, "top_k", "top_k must be >= 0"),
        ({"max_tokens": 0}, "max_tokens", "max_tokens must be in [1, 1024]"),
        ({"max_tokens": 5000}, "max_tokens", "max_tokens must be in [1, 1024]"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens", "min_tokens must be in [0, max_tokens=10]"),
        ({"repetition_penalty": 0.5}, "repetition_penalty", "repetition_penalty must be in [1, 100]"),
        ({"logprobs": 21}, "logprobs", "logprobs must be in [0, 20]"),
        ({"stop": ["ok", ""]}, "stop", "stop strings must not be empty"),
        ({"n": 0}, "n", "n must be in [1, 32]"),
        ({"n": 20, "prompt": ["a", "b"]}, "n", "n must be in [1, 16] for 2 prompt(s)"),
        ({"prompt": []}, "prompt", "non-empty list"),
        ({"prompt": 42}, "prompt", "valid string"),
        ({"seed": -1}, "seed", "seed must be in [0, 2**63 - 1]"),
        ({"seed": 2**64}, "seed", "seed must be in [0, 2**63 - 1]"),
        ({"label": "meh"}, "label", "label must be one of: pos, neg"),
        ({"negative_label": "meh", "guidance_scale": 2}, "negative_label", "negative_label must be one of: pos, neg"),
        ({"negative_prompt": "dull"}, "negative_prompt", "only acts with guidance: set guidance_scale above 1"),
        ({"negative_label": "neg"}, "negative_label", "only acts with guidance"),
        ({"guidance_scale": 0.5}, "guidance_scale", "guidance_scale must be in [1, 20]"),
        ({"guidance_scale": 2, "negative_prompt": "\ud800"}, "negative_prompt", "lone surrogate"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"stream": "maybe"}, "stream", "valid boolean"),
        ({"presence_penalty": 0.5}, "presence_penalty", "not supported"),
        ({"model": None}, "model", "valid string"),
        ({"max_tokens": "5"}, "max_tokens", "valid integer"),
        ({"stream_options": {"include_usage": 1}}, "stream_options", "valid boolean"),
        ({"prompt": "\ud800"}, "prompt", "lone surrogate"),
        ({"stop": ["\udfff"]}, "stop", "lone surrogate"),
    ],
)
def test_completions_bad_parameter_is_400_naming_field(client, fields, param, fragment):
    # json.dumps escapes to ASCII, so lone surrogates travel as `\ud800` the way a JSON client may send them.
    body = json.dumps({"model": MODEL, **fields})
    response = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert fragment in error["message"]


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": 1e-3},
        {"temperature": 100},
        {"repetition_penalty": 100, "prompt": "a wonderful film"},
        {"top_p": 1e-6},
        {"stop": ["x" * 256] * 16},
        {"top_k": 10**30},
        {"seed": 2**63 - 1, "n": 3},
        {"stop": ["\u0000", "\n"]},
        {"prompt": "<|endoftext|><|pos|><|pad|>"},
        {"logprobs": 20, "n": 32},
    ],
)
def test_completions_extreme_but_valid_values_succeed(client, fields):
    body = complete(client, max_tokens=3, **fields)
    assert all(c["finish_reason"] in ("stop", "length") for c in body["choices"])


def test_completions_smallest_top_p_and_temperature_are_greedy(client):
    # At the edges of their ranges the sampler still has one clear winner (once: NaN, last token repeated).
    greedy = complete(client, prompt="a film", max_tokens=8, min_tokens=8, temperature=0)["choices"][0]["text"]
    for fields in ({"top_p": 1e-6, "temperature": 1.0}, {"temperature": 1e-3}):
        body = complete(client, prompt="a film", max_tokens=8, min_tokens=8, seed=5, **fields)
        assert body["choices"][0]["text"] == greedy, fields


def test_completions_non_finite_float_is_400(client):
    response = client.post(
        "/v1/completions", content=b'{"model": "run", "temperature": NaN}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and response.json()["error"]["param"] == "temperature"


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'"text"'])
def test_completions_malformed_body_is_400(client, content):
    response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_completions_null_options_take_defaults(client):
    body = complete(client, prompt=None, max_tokens=None, temperature=None, n=None, stop=None, logprobs=None)
    assert body["usage"]["completion_tokens"] <= 16 and len(body["choices"]) == 1


def test_completions_unknown_model_is_404(client):
    response = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found" and "'run'" in response.json()["error"]["message"]
    assert client.get("/v1/models/gpt-4").status_code == 404
    assert client.get("/v1/models/run").json()["id"] == MODEL


def test_unknown_route_and_method_use_error_shape(client):
    assert client.get("/v1/nothing").json()["error"]["code"] == "not_found"
    response = client.get("/v1/completions")
    assert response.status_code == 405 and response.json()["error"]["code"] == "method_not_allowed"


def test_api_key_is_required_when_set(make_app):
    with TestClient(make_app(api_key="s3cret")) as client:
        assert client.get("/health").status_code == 200  # health checks need no key
        assert client.get("/").status_code == 200  # nor does the playground page
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = client.post("/v1/completions", json={"model": MODEL}, headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/v1/models").status_code == 401
        ok = client.post(
            "/v1/completions", json={"model": MODEL, "max_tokens": 2}, headers={"Authorization": "Bearer s3cret"}
        )
        assert ok.status_code == 200


def test_body_over_limit_is_413(make_app):
    with TestClient(make_app(max_body_bytes=2048)) as client:
        big = json.dumps({"model": MODEL, "prompt": "x" * 4000})
        response = client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        # A chunked body declares no length; the bytes received are counted instead.
        chunked = client.post(
            "/v1/completions",
            content=iter([big[:1500].encode(), big[1500:].encode()]),
            headers={"content-type": "application/json"},
        )
        assert chunked.status_code == 413
        assert client.post("/v1/completions", json={"model": MODEL, "max_tokens": 1}).status_code == 200


def test_prompt_over_limit_is_413(make_app):
    with TestClient(make_app(max_prompt_tokens=8)) as client:
        response = client.post("/v1/completions", json={"model": MODEL, "prompt": "a wonderful film " * 10})
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "context_length_exceeded"
        assert "--max-prompt-tokens" in response.json()["error"]["message"]
        guided = {"model": MODEL, "prompt": "ok", "guidance_scale": 2, "negative_prompt": "a dull film " * 10}
        response = client.post("/v1/completions", json=guided)
        assert response.status_code == 413 and response.json()["error"]["param"] == "negative_prompt"


def test_run_summary_reports_size_labels_and_val_bpb(make_run):
    from aigc.config import ServeConfig
    from aigc.models import load_run
    from aigc.serve import create_app

    run_dir = make_run()
    for step, bpb in ((100, 2.5), (200, 2.1), (300, 2.2)):
        append_jsonl(run_dir / "metrics.jsonl", {"step": step, "tokens": step * 1000, "val_bpb": bpb})
    run = load_run(run_dir)
    with TestClient(create_app(run, ServeConfig(model_name="tiny-gpt", allowed_hosts=("testserver",)))) as client:
        summary = client.get("/v1/run").json()
        assert client.get("/v1/models").json()["data"][0]["id"] == "tiny-gpt"
    assert summary["model"] == "tiny-gpt" and summary["params"] == run.model.num_params()
    assert summary["labels"] == ["pos", "neg"] and summary["block_size"] == 64
    assert (summary["step"], summary["val_bpb"], summary["best_val_bpb"]) == (300, 2.2, 2.1)
    assert summary["family"] == "GPT-2" and summary["description"].startswith("GPT-2: ")


def test_run_summary_names_a_llama_shaped_run_by_its_family(make_run):
    from aigc.config import LLAMA_STYLE, ServeConfig
    from aigc.models import load_run
    from aigc.serve import create_app

    run = load_run(make_run(**LLAMA_STYLE))
    with TestClient(create_app(run, ServeConfig(allowed_hosts=("testserver",)))) as client:
        summary = client.get("/v1/run").json()
    params = run.model.num_params()
    assert summary["family"] == "Llama" and summary["trainable"] is None
    assert summary["description"] == f"Llama: {params / 1e6:.2f} M parameters; 2 layers × 64, 2 heads, context 64, " + (
        f"vocabulary {run.tokenizer.vocab_size:,}"
    )


def test_server_bug_is_500_in_error_shape(make_app, monkeypatch):
    from aigc.serve import api

    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(api, "plan_request", broken)
    with TestClient(make_app(), raise_server_exceptions=False) as client:
        response = client.post("/v1/completions", json={"model": MODEL})
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "internal server error (RuntimeError)",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_health_reports_queue_and_batches(client):
    expected = {"status": "ok", "model": MODEL, "queued": 0, "running": 0, "batches": 0, "sequences": 0}
    assert client.get("/health").json() == expected
    complete(client, prompt=["a", "b"], n=2, max_tokens=1)
    assert client.get("/health").json() == {**expected, "batches": 1, "sequences": 4}


def test_playground_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in (
        'id="prompt"',
        'id="label"',
        'id="temperature"',
        'id="top-p"',
        'id="max-tokens"',
        'id="seed"',
        'id="generate"',
        'id="colour"',
        'id="summary"',
    ):
        assert element in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200
        assert "http://" not in response.text and "https://" not in response.text  # no CDN: works offline
    assert "https://" not in page.text and "http://" not in page.text
