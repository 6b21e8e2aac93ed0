"""Translate between the OpenAI completions schema and the decode API, and build error bodies.

Pure functions (no HTTP framework objects), so each rule is testable on its own. Value ranges come
from `SampleConfig` (messages renamed to the API's field names) and from the server's limits.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from aigc.config import SampleConfig, ServeConfig
from aigc.errors import AigcError, check_text
from aigc.generate import Completion, Request, TokenEvent
from aigc.serve.schemas import CompletionRequest
from aigc.serve.structured_api import FieldError, json_fields, response_grammar
from aigc.tokenizer import Tokenizer

SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes 64-bit seeds; n > 1 adds the choice number

# SampleConfig speaks in CLI flags; the API names the same options after OpenAI's fields.
_FIELD_OF_FLAG = {
    "--max-new-tokens": "max_tokens",
    "--min-new-tokens": "min_tokens",
    "--temperature": "temperature",
    "--top-k": "top_k",
    "--top-p": "top_p",
    "--repetition-penalty": "repetition_penalty",
    "--stop": "stop",
    "--logprobs": "logprobs",
    "--guidance-scale": "guidance_scale",
}
_FLAG = re.compile("|".join(re.escape(flag) for flag in _FIELD_OF_FLAG))

# OpenAI fields this server does not implement: accepted only at their neutral value.
_UNSUPPORTED = {
    "echo": (False, None),
    "best_of": (1, None),
    "presence_penalty": (0, 0.0, None),
    "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Plan:
    """What one completions request asks for: the rows to decode and how to answer."""

    rows: tuple[Request, ...]  # prompt-major: choice index = prompt number * n + j
    prompts: tuple[str, ...]
    want_logprobs: bool


def plan_request(body: CompletionRequest, tokenizer: Tokenizer, limits: ServeConfig) -> Plan:
    """Check every field of a request against the run and the server's limits; raise ApiError."""
    _reject_unsupported(body)
    prompts = (body.prompt,) if isinstance(body.prompt, str) else tuple(body.prompt)
    if not prompts:
        raise ApiError(400, "prompt must be a string or a non-empty list of strings", param="prompt")
    stops = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    for param, texts in (("prompt", prompts), ("stop", stops), ("negative_prompt", (body.negative_prompt,))):
        check_texts(param, texts)
    if body.n < 1 or body.n * len(prompts) > limits.max_batch:
        raise ApiError(
            400,
            f"n must be in [1, {max(1, limits.max_batch // len(prompts))}] for {len(prompts)} prompt(s): "
            f"n x prompts may not exceed the server's --max-batch ({limits.max_batch}), got n={body.n}",
            param="n",
        )
    for param, label in (("label", body.label), ("negative_label", body.negative_label)):
        if label is not None and label not in tokenizer.labels:
            known = ", ".join(tokenizer.labels) or "none (the run was trained without labels)"
            raise ApiError(400, f"{param} must be one of: {known}; got {label!r}", param=param)
    if body.seed is not None and not 0 <= body.seed < SEED_LIMIT:
        raise ApiError(400, f"seed must be in [0, 2**63 - 1], got {body.seed}", param="seed")
    config = sample_config(body, limits, vocab_size=tokenizer.vocab_size)
    _check_guidance(body)
    grammar = checked_grammar(lambda: response_grammar((body.model_extra or {}).get("response_format")))
    # (field, text, control tokens before it): each prompt, then the context guidance steers away from
    contexts = [("prompt", prompt, int(body.label is not None)) for prompt in prompts]
    contexts.append(("negative_prompt", body.negative_prompt, int(body.negative_label is not None)))
    for param, text, control_tokens in contexts:
        size = len(tokenizer.encode(text)) + control_tokens
        if size > limits.max_prompt_tokens:
            raise ApiError(
                413,
                f"{param} is {size} tokens; this server takes at most {limits.max_prompt_tokens} (--max-prompt-tokens)",
                param=param,
                code="context_length_exceeded",
            )
    rows = tuple(
        Request(
            prompt=prompt,
            label=body.label,
            config=choice_config(config, j),
            negative_prompt=body.negative_prompt,
            negative_label=body.negative_label,
            grammar=grammar,
        )
        for prompt in prompts
        for j in range(body.n)
    )
    return Plan(rows=rows, prompts=prompts, want_logprobs=body.logprobs is not None)


def checked_grammar(build: Callable):
    """What `build` returns; its FieldError (a bad response_format, tools, tool_choice) as a 400."""
    try:
        return build()
    except FieldError as exc:
        raise ApiError(400, str(exc), param=exc.param) from exc


def sample_config(body: CompletionRequest, limits: ServeConfig, *, vocab_size: int) -> SampleConfig:
    """The request's sampling options as a SampleConfig, its errors renamed to the API's fields."""
    if not 1 <= body.max_tokens <= limits.max_tokens_limit:
        raise ApiError(
            400,
            f"max_tokens must be in [1, {limits.max_tokens_limit}] on this server, got {body.max_tokens}",
            param="max_tokens",
        )
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SampleConfig(
            max_new_tokens=body.max_tokens,
            min_new_tokens=body.min_tokens,
            temperature=body.temperature,
            top_k=min(body.top_k, vocab_size),  # k >= vocabulary keeps every token anyway
            top_p=body.top_p,
            repetition_penalty=body.repetition_penalty,
            stop=stop,
            seed=body.seed,
            logprobs=body.logprobs or 0,
            guidance_scale=body.guidance_scale,
        )
    except AigcError as exc:
        raise config_error(exc) from exc


def _check_guidance(body: CompletionRequest) -> None:
    """A negative prompt or label does nothing without guidance: say so rather than ignore it."""
    if body.guidance_scale == 1.0:
        for param, given in (("negative_prompt", body.negative_prompt), ("negative_label", body.negative_label)):
            if given:
                raise ApiError(400, f"{param} only acts with guidance: set guidance_scale above 1, e.g. 3", param=param)


def config_error(exc: AigcError) -> ApiError:
    """A SampleConfig message with CLI flags renamed to API fields; `param` is the first one named."""
    message = str(exc)
    first = _FLAG.search(message)
    message = _FLAG.sub(lambda m: _FIELD_OF_FLAG[m.group(0)], message).replace("max-new-tokens", "max_tokens")
    return ApiError(400, message, param=_FIELD_OF_FLAG[first.group(0)] if first else None)


def choice_config(config: SampleConfig, j: int) -> SampleConfig:
    """Choice j of a seeded request uses seed + j, so n choices differ yet stay reproducible."""
    if config.seed is None or j == 0:
        return config
    return replace(config, seed=(config.seed + j) % SEED_LIMIT)


def check_texts(param: str, texts: Sequence[str | None]) -> None:
    """JSON escapes can smuggle lone surrogates into a str; they cannot be encoded or tokenized: 400."""
    for i, text in enumerate(texts):
        if text is not None:
            try:
                check_text(text, param if len(texts) == 1 else f"{param}[{i}]")
            except AigcError as exc:
                raise ApiError(400, str(exc), param=param) from None


def _reject_unsupported(body: CompletionRequest) -> None:
    for name, value in (body.model_extra or {}).items():
        if name in _UNSUPPORTED and value not in _UNSUPPORTED[name]:
            raise ApiError(400, f"{name} is not supported by this server; leave it out", param=name)


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def logprobs_block(events: Sequence[TokenEvent], offset: int) -> dict:
    """OpenAI's completions `logprobs` for these tokens; text_offset counts characters from `offset`."""
    offsets = []
    for event in events:
        offsets.append(offset)
        offset += len(event.text)
    return {
        "tokens": [e.text for e in events],
        "token_logprobs": [e.logprob for e in events],
        "top_logprobs": [dict(e.top_logprobs) for e in events],
        "text_offset": offsets,
    }


def usage(completions: Sequence[Completion], n: int) -> dict:
    """Token counts; each prompt is counted once however many choices it has (as OpenAI does)."""
    prompt = sum(c.prompt_tokens for c in completions[::n])
    generated = sum(len(c.token_ids) for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def completion_body(
    meta: dict, plan: Plan, n: int, completions: Sequence[Completion], events: Sequence[Sequence[TokenEvent]]
) -> dict:
    """The non-streaming response. `meta` holds id, created and model."""
    choices = []
    for c in sorted(completions, key=lambda c: c.index):
        prompt = plan.prompts[c.index // n]
        logprobs = logprobs_block(events[c.index], len(prompt)) if plan.want_logprobs else None
        choice = {"text": c.text, "index": c.index, "logprobs": logprobs, "finish_reason": c.finish_reason}
        choices.append({**choice, **json_fields(c)})
    return {**meta, "object": "text_completion", "choices": choices, "usage": usage(completions, n)}


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def chunk(
    meta: dict, index: int, text: str, logprobs: dict | None, finish_reason: str | None, extra: dict | None = None
) -> str:
    """One streamed choice fragment, in OpenAI's completions chunk format (`extra`: extension fields)."""
    choice = {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason, **(extra or {})}
    return sse({**meta, "object": "text_completion", "choices": [choice]})


async def stream_events(
    job,
    *,
    token_chunk: Callable[[int, TokenEvent], str | None],
    closing_chunks: Callable[[list[Completion]], Iterable[str]],
    failure: Callable[[BaseException], ApiError],
    opening: Iterable[str] = (),
) -> AsyncIterator[str]:
    """Server-sent events of one scheduler job, shared by completions and chat: the `opening` chunks,
    a chunk per token event (when `token_chunk` makes one), the closing chunks of the completions, then
    `[DONE]`; a failed decode ends the stream with its error. The job is cancelled however it ends."""
    try:
        for opening_chunk in opening:
            yield opening_chunk
        while True:
            kind, row, payload = await job.next()
            if kind == "event":
                token = token_chunk(row, payload)
                if token is not None:
                    yield token
            elif kind == "done":
                for closing in closing_chunks(payload):
                    yield closing
                break
            else:
                yield sse(failure(payload).body())
                break
        yield sse("[DONE]")
    finally:
        job.cancel()  # finished, or the client went away: the worker stops sending to this job
