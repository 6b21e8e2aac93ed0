"""Text generation: one streaming decode loop (the sampling itself is in `aigc.sampling`).

Every caller (CLI, batch, eval, HTTP server, demo) goes through `decode_stream`, which batches all
requests together through the back-end of the model's kind (`aigc.models.decode`: left padding, pad
mask and KV cache for the GPT, per-row carried state for the LSTM), and yields one `TokenEvent` per
generated token as soon as it exists. It returns a `DecodeStream`: iterate it for the tokens, then
read its `.completions`.

Choices worth knowing:
- Every context starts with `<|endoftext|>` (then the label's control token, then the prompt), the
  way each document follows the previous one in the training stream; so an empty prompt starts a
  fresh document.
- GPT context limit: a prompt longer than `block_size` keeps its last tokens (the `<|endoftext|>` and
  label prefix always stay). When the cache fills during generation, the window slides: the loop
  re-prefills the prefix plus the last `block_size // 2` tokens of every row and carries on.
- Each row has its own seeded `torch.Generator`, so a seed gives the same text whatever else is in
  the batch. The padding token and label control tokens are never generated.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from aigc.config import SampleConfig
from aigc.errors import AigcError
from aigc.guidance import GuidedBackend, NegativeRow
from aigc.models import kinds
from aigc.sampling import Sampler
from aigc.structured import Grammar, GrammarState, allowed_tokens
from aigc.textstream import TextStream
from aigc.tokenizer import Tokenizer


@dataclass(frozen=True)
class Request:
    prompt: str = ""  # may be empty: starts a document from scratch
    label: str | None = None  # prefixes the label's control token <|label|>
    config: SampleConfig = field(default_factory=SampleConfig)  # per-request sampling options
    # Chat: the whole context, already encoded by a chat template (no <|endoftext|> or label prefix is
    # added, `prompt` and `label` are ignored); the caller keeps it within the context (never slid off).
    prompt_ids: tuple[int, ...] | None = None
    stop_ids: tuple[int, ...] = ()  # tokens that end the text like <|endoftext|> (e.g. <|im_end|>)
    # Classifier-free guidance (config.guidance_scale > 1, see aigc.guidance): the context to steer
    # away from is <|endoftext|>, this label's control token, then this prompt (each may be left out).
    negative_prompt: str = ""
    negative_label: str | None = None
    # Structured output (aigc.structured): every generated token keeps the text inside this grammar,
    # and the row ends when the grammar is complete.
    grammar: Grammar | None = None


@dataclass(frozen=True)
class TokenEvent:
    index: int  # which request (row) this token belongs to
    token_id: int
    text: str  # new text this token adds ('' while a multi-byte character is incomplete)
    logprob: float  # log-probability of the token under the raw logits (temperature 1)
    top_logprobs: tuple[tuple[str, float], ...] = ()  # top-K alternatives when config.logprobs > 0


@dataclass(frozen=True)
class Completion:
    index: int
    text: str  # generated text only (prompt excluded), stop string excluded
    token_ids: tuple[int, ...]  # generated tokens, the final <|endoftext|> included when it ended the text
    finish_reason: str  # "stop" (end-of-text or a stop string) | "length"
    prompt_tokens: int  # tokens fed before generation: <|endoftext|>, label token, prompt
    logprobs: tuple[TokenEvent, ...] | None = None  # when config.logprobs > 0
    # Requests with a grammar: True when the text is a whole sentence of it (e.g. the JSON object closed);
    # False when a length limit or a stop string cut it short. None without a grammar.
    complete: bool | None = None


# ---------------------------------------------------------------------------------------------
# Prompts and text
# ---------------------------------------------------------------------------------------------


def prompt_prefix(tokenizer: Tokenizer, request: Request) -> list[int]:
    """`<|endoftext|>` then the label's control token; unknown labels raise AigcError listing the known ones.
    Nothing for a request with `prompt_ids` (its template decides how the context starts)."""
    if request.prompt_ids is not None:
        return []
    prefix = [tokenizer.eot_id]
    if request.label is not None:
        prefix.append(tokenizer.label_id(request.label))
    return prefix


def encode_request(tokenizer: Tokenizer, request: Request) -> list[int]:
    """Every token fed to the model before generation: prefix, then the prompt."""
    return prompt_prefix(tokenizer, request) + _prompt_body(tokenizer, request)


def _prompt_body(tokenizer: Tokenizer, request: Request) -> list[int]:
    return list(request.prompt_ids) if request.prompt_ids is not None else tokenizer.encode(request.prompt)


def context_limit(model: nn.Module) -> int | None:
    """Most tokens the model attends to at once (None: unlimited, the LSTM carries state)."""
    return kinds.context_limit(model)


@dataclass
class _Row:
    """Book-keeping of one request while it decodes."""

    index: int
    request: Request
    prefix: list[int]
    body: list[int]  # prompt tokens, then every generated token
    stream: TextStream
    generated: list[int] = field(default_factory=list)
    events: list[TokenEvent] = field(default_factory=list)
    finish_reason: str | None = None
    negative: NegativeRow | None = None  # guided rows: the negative context (aigc.guidance)
    grammar: GrammarState | None = None  # constrained rows: where the text stands in its grammar

    def window(self, limit: int) -> list[int]:
        """The prefix plus as many of the latest tokens as fit in `limit`."""
        room = limit - len(self.prefix)
        return self.prefix + (self.body[-room:] if room > 0 else [])

    def completion(self, prompt_tokens: int) -> Completion:
        config = self.request.config
        return Completion(
            index=self.index,
            text=self.stream.text,
            token_ids=tuple(self.generated),
            finish_reason=self.finish_reason or "length",
            prompt_tokens=prompt_tokens,
            logprobs=tuple(self.events) if config.logprobs > 0 else None,
            complete=None if self.grammar is None else self.grammar.complete and not self.stream.stopped,
        )


# ---------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------


class DecodeStream:
    """One batched decode. Iterate it for each TokenEvent as soon as it exists; once the iteration
    has ended, `completions` holds one Completion per request, in request order.

        stream = decode_stream(model, tokenizer, requests)
        for event in stream:
            ...  # or nothing: `generate` is exactly this loop
        stream.completions

    `close()` stops early (e.g. every caller has gone); `completions` then raises.
    """

    def __init__(self, model: nn.Module, tokenizer: Tokenizer, requests: Sequence[Request]):
        # Unknown labels raise AigcError here, before any work.
        self._rows = [_start_row(i, request, tokenizer) for i, request in enumerate(requests)]
        self._completions: list[Completion] | None = None
        self._events = self._decode(model, tokenizer)

    def __iter__(self) -> Iterator[TokenEvent]:
        return self._events

    @property
    def completions(self) -> list[Completion]:
        if self._completions is None:
            raise RuntimeError("the decode has not finished: iterate the stream to its end first")
        return self._completions

    def close(self) -> None:
        """Stop decoding now (the model's training mode is restored)."""
        self._events.close()

    def _decode(self, model: nn.Module, tokenizer: Tokenizer) -> Iterator[TokenEvent]:
        rows = self._rows
        if not rows:
            self._completions = []
            return
        limit = context_limit(model)
        contexts = [row.window(limit) if limit else row.prefix + row.body for row in rows]
        was_training = model.training
        model.eval()
        try:
            yield from _decode_rows(model, tokenizer, rows, contexts)
        finally:
            model.train(was_training)
        self._completions = [row.completion(len(context)) for row, context in zip(rows, contexts)]


def decode_stream(model: nn.Module, tokenizer: Tokenizer, requests: Sequence[Request]) -> DecodeStream:
    """Decode every request in one batch: iterate the result for tokens, then read `.completions`.
    Unknown labels raise AigcError before any work."""
    return DecodeStream(model, tokenizer, requests)


def generate(model: nn.Module, tokenizer: Tokenizer, requests: Sequence[Request]) -> list[Completion]:
    """Run a decode to the end and return one Completion per request, in request order."""
    stream = decode_stream(model, tokenizer, requests)
    for _ in stream:
        pass
    return stream.completions


def _decode_rows(
    model: nn.Module, tokenizer: Tokenizer, rows: list[_Row], contexts: list[list[int]]
) -> Iterator[TokenEvent]:
    """The loop itself: prefill every row, then one token per active row per step until all finish."""
    device = next(model.parameters()).device
    limit = context_limit(model)
    backend = kinds.decode_backend(model, tokenizer.pad_id, device)
    if any(row.negative for row in rows):
        scales = [row.request.config.guidance_scale for row in rows]
        backend = GuidedBackend(backend, [row.negative for row in rows], scales, limit)
    token_bytes = functools.lru_cache(maxsize=None)(tokenizer.token_bytes)  # bytes of each token id
    with torch.inference_mode():
        logits = backend.prefill(contexts)  # (B, V)
        sampler = Sampler(
            [row.request.config for row in rows], [row.body for row in rows], tokenizer, logits.size(-1), device
        )
    active, step = rows, 0
    while active:
        with torch.inference_mode():
            allowed = allowed_tokens([row.grammar for row in active], logits.size(-1))  # (B, V) or None
            tokens = sampler.pick(logits, step, allowed)  # (B,)
            logprobs = logits.float().log_softmax(dim=-1)  # (B, V), temperature 1, before any processing
            chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)  # (B,)
            alternatives = _top_alternatives(logprobs, sampler.configs, tokenizer)
        for row, token, logprob, top in zip(active, tokens.tolist(), chosen.tolist(), alternatives):
            yield _advance(row, token, logprob, top, tokenizer.eot_id, token_bytes)
        step += 1
        kept = [j for j, row in enumerate(active) if row.finish_reason is None]
        if not kept:
            return
        with torch.inference_mode():
            if len(kept) < len(active):  # drop finished rows so they cost nothing more
                index = torch.tensor(kept, device=device)
                backend.keep(index)
                sampler.keep(index, kept)
                tokens = tokens[index]
            active = [active[j] for j in kept]
            logits = backend.step(tokens.unsqueeze(1), active)


def _start_row(index: int, request: Request, tokenizer: Tokenizer) -> _Row:
    prefix = prompt_prefix(tokenizer, request)
    row = _Row(index, request, prefix, _prompt_body(tokenizer, request), TextStream(request.config.stop))
    guided = request.config.guidance_scale != 1.0
    if not guided and (request.negative_prompt or request.negative_label is not None):
        raise AigcError("a negative prompt or label only acts with guidance: set --guidance-scale above 1 (e.g. 3)")
    if guided:
        if request.prompt_ids is not None:
            raise AigcError("guidance needs a text prompt; it is not available for chat requests")
        negative = [tokenizer.eot_id]
        if request.negative_label is not None:
            negative.append(tokenizer.label_id(request.negative_label))
        row.negative = NegativeRow(negative, tokenizer.encode(request.negative_prompt), row.generated)
    if request.grammar is not None:
        row.grammar = GrammarState(tokenizer, request.grammar, request.stop_ids)
    return row


def _advance(row: _Row, token: int, logprob: float, top, eot: int, token_bytes) -> TokenEvent:
    """Record one generated token for a row, decide whether the row is done, and describe it."""
    config = row.request.config
    row.generated.append(token)
    row.body.append(token)
    ended = token == eot or token in row.request.stop_ids
    if row.grammar is not None and not ended:
        ended = row.grammar.advance(token)  # a complete grammar ends the row like end-of-text
    last = ended or len(row.generated) >= config.max_new_tokens
    text = row.stream.push(token_bytes(token), final=last)
    if ended or row.stream.stopped:
        row.finish_reason = "stop"
    elif last:
        row.finish_reason = "length"
    event = TokenEvent(index=row.index, token_id=token, text=text, logprob=logprob, top_logprobs=top)
    if config.logprobs > 0:
        row.events.append(event)
    return event


def _top_alternatives(logprobs: torch.Tensor, configs: list[SampleConfig], tokenizer: Tokenizer) -> list[tuple]:
    """For each row, its `config.logprobs` most likely tokens as (token text, logprob) pairs."""
    k = max(c.logprobs for c in configs)
    if k == 0:
        return [()] * len(configs)
    values, ids = logprobs.topk(k, dim=-1)  # (B, k) each
    values, ids = values.tolist(), ids.tolist()
    return [
        tuple((tokenizer.decode([i], skip_special=False), v) for i, v in zip(ids[r], values[r]))[: c.logprobs]
        for r, c in enumerate(configs)
    ]
