"""Translate between OpenAI's chat completions schema and the decode API.

A request's messages are rendered with the run's chat template (`aigc.chat`) into token ids; each of
its `n` choices is one decode row that stops at the template's end-of-turn token. Rows go through the
same scheduler (and batches) as `/v1/completions`. Pure functions except `stream_chat`, which turns a
job's results into server-sent `chat.completion.chunk` events.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

from aigc.chat import ChatTemplate, encode_chat, parse_messages, room_left
from aigc.config import SampleConfig, ServeConfig
from aigc.errors import AigcError
from aigc.generate import Completion, Request, TokenEvent
from aigc.serve import api
from aigc.serve.api import ApiError
from aigc.serve.schemas import ChatCompletionRequest
from aigc.serve.structured_api import (
    ToolCallStream,
    ToolPlan,
    assistant_message,
    json_fields,
    plan_tools,
    response_grammar,
)
from aigc.tokenizer import Tokenizer
from aigc.tools import fallback_messages, template_knows_tools

MAX_TOP_LOGPROBS = 20
# OpenAI fields this server does not implement: accepted only at their neutral value.
_UNSUPPORTED = {
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "functions": (None, []),
}


@dataclass(frozen=True)
class ChatPlan:
    rows: tuple[Request, ...]  # one per choice
    want_logprobs: bool
    tools: ToolPlan | None = None  # the request's tools: replies may be tool calls


def plan_chat(
    body: ChatCompletionRequest, tokenizer: Tokenizer, template: ChatTemplate, limits: ServeConfig, context: int | None
) -> ChatPlan:
    """Check a chat request against the run, its template and the server's limits; raise ApiError."""
    for name, value in (body.model_extra or {}).items():
        if name in _UNSUPPORTED and value not in _UNSUPPORTED[name]:
            raise ApiError(400, f"{name} is not supported by this server; leave it out", param=name)
    try:
        messages = parse_messages([m.model_dump(exclude_unset=True) for m in body.messages])
    except AigcError as exc:
        raise ApiError(400, str(exc), param="messages") from exc
    extra = body.model_extra or {}
    response_format = extra.get("response_format")
    tools = api.checked_grammar(lambda: plan_tools(extra.get("tools"), extra.get("tool_choice"), response_format))
    grammar = api.checked_grammar(lambda: response_grammar(response_format))
    if tools and tools.grammar:  # a call (required, named), or a call or the response_format's JSON (auto)
        grammar = tools.grammar
    tool_defs = [t.to_json() for t in tools.tools] if tools and tools.choice != "none" else None
    if not template_knows_tools(template.source):  # written into the conversation as text instead
        messages, tool_defs = fallback_messages(messages, tools.tools if tool_defs else ()), None
    if not 1 <= body.n <= limits.max_batch:
        raise ApiError(400, f"n must be in [1, {limits.max_batch}] (--max-batch), got {body.n}", param="n")
    if body.seed is not None and not 0 <= body.seed < api.SEED_LIMIT:
        raise ApiError(400, f"seed must be in [0, 2**63 - 1], got {body.seed}", param="seed")
    asked, param = _max_tokens(body, limits)
    try:
        prompt = encode_chat(template, tokenizer, messages, context=context, max_new_tokens=asked or 1, tools=tool_defs)
    except AigcError as exc:
        code = "context_length_exceeded" if "too many" in str(exc) else None
        raise ApiError(400, str(exc), param=param if code and asked else "messages", code=code) from exc
    if len(prompt.ids) > limits.max_prompt_tokens:
        raise ApiError(
            413,
            f"the conversation is {len(prompt.ids)} tokens; this server takes at most {limits.max_prompt_tokens} "
            "(--max-prompt-tokens)",
            param="messages",
            code="context_length_exceeded",
        )
    max_new = asked or room_left(len(prompt.ids), context, limits.max_tokens_limit)
    config = _sample_config(body, max_new, tokenizer.vocab_size)
    rows = tuple(
        Request(prompt_ids=prompt.ids, stop_ids=prompt.stop_ids, config=api.choice_config(config, j), grammar=grammar)
        for j in range(body.n)
    )
    return ChatPlan(rows=rows, want_logprobs=body.logprobs, tools=tools)


def _max_tokens(body: ChatCompletionRequest, limits: ServeConfig) -> tuple[int | None, str]:
    """The asked-for limit (None: whatever fits) and the field it came from."""
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if asked is not None and not 1 <= asked <= limits.max_tokens_limit:
        raise ApiError(
            400, f"{param} must be in [1, {limits.max_tokens_limit}] on this server, got {asked}", param=param
        )
    return asked, param


def _sample_config(body: ChatCompletionRequest, max_new: int, vocab_size: int) -> SampleConfig:
    top = body.top_logprobs or 0
    if body.top_logprobs is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}", param="top_logprobs")
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    api.check_texts("stop", stop)
    try:
        return SampleConfig(
            max_new_tokens=max_new,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=stop,
            seed=body.seed,
            # The decode loop keeps events (and alternatives) only with logprobs > 0; extra ones are cut here.
            logprobs=max(top, 1) if body.logprobs else 0,
        )
    except AigcError as exc:
        raise api.config_error(exc) from exc


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def logprobs_content(events: Sequence[TokenEvent], top: int, token_text: Callable[[int], str]) -> dict:
    """OpenAI's chat `logprobs`: per token its text, log-probability, UTF-8 bytes and `top` alternatives."""
    content = []
    for event in events:
        text = token_text(event.token_id)
        alternatives = [
            {"token": t, "logprob": lp, "bytes": list(t.encode("utf-8", "replace"))}
            for t, lp in event.top_logprobs[:top]
        ]
        content.append(
            {
                "token": text,
                "logprob": event.logprob,
                "bytes": list(text.encode("utf-8", "replace")),
                "top_logprobs": alternatives,
            }
        )
    return {"content": content}


def chat_body(
    meta: dict,
    plan: ChatPlan,
    top: int,
    completions: Sequence[Completion],
    events: Sequence[Sequence[TokenEvent]],
    token_text: Callable[[int], str],
) -> dict:
    """The non-streaming response. `meta` holds id, created and model."""
    choices = []
    for c in sorted(completions, key=lambda c: c.index):
        message, finish_reason = assistant_message(c, plan.tools)
        logprobs = logprobs_content(events[c.index], top, token_text) if plan.want_logprobs else None
        choice = {"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        choices.append({**choice, **json_fields(c)})
    return {**meta, "object": "chat.completion", "choices": choices, "usage": api.usage(completions, len(plan.rows))}


def chat_chunk(
    meta: dict, index: int, delta: dict, logprobs: dict | None, finish_reason: str | None, extra: dict | None = None
) -> str:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason, **(extra or {})}
    return api.sse({**meta, "object": "chat.completion.chunk", "choices": [choice]})


def stream_chat(
    job,
    plan: ChatPlan,
    meta: dict,
    *,
    top: int,
    include_usage: bool,
    token_text: Callable[[int], str],
    failure: Callable[[BaseException], ApiError],
) -> AsyncIterator[str]:
    """Server-sent events: the assistant role per choice, one content delta per token, one closing chunk
    per choice with its finish_reason, the usage when asked, then `[DONE]`."""

    calls = [ToolCallStream(plan.tools) for _ in plan.rows] if plan.tools else None

    def token_chunk(row: int, event) -> str | None:
        logprobs = logprobs_content([event], top, token_text) if plan.want_logprobs else None
        if calls is not None:  # a reply that may be a tool call streams as delta.tool_calls
            deltas = calls[row].feed(event.text)
            return "".join(chat_chunk(meta, row, delta, logprobs, None) for delta in deltas) or None
        return chat_chunk(meta, row, {"content": event.text}, logprobs, None) if event.text or logprobs else None

    def closing(c) -> list[str]:
        if calls is None:
            return [chat_chunk(meta, c.index, {}, None, c.finish_reason, json_fields(c))]
        deltas, reason = calls[c.index].finish(c)
        return [chat_chunk(meta, c.index, delta, None, None) for delta in deltas] + [
            chat_chunk(meta, c.index, {}, None, reason, json_fields(c))
        ]

    def closing_chunks(completions) -> list[str]:
        ordered = sorted(completions, key=lambda c: c.index)
        chunks = [chunk for c in ordered for chunk in closing(c)]
        if include_usage:
            usage = api.usage(completions, len(plan.rows))
            chunks.append(api.sse({**meta, "object": "chat.completion.chunk", "choices": [], "usage": usage}))
        return chunks

    opening = [
        chat_chunk(meta, index, {"role": "assistant", "content": ""}, None, None) for index in range(len(plan.rows))
    ]
    return api.stream_events(
        job, token_chunk=token_chunk, closing_chunks=closing_chunks, failure=failure, opening=opening
    )
