"""Where each assistant turn lies in a rendered conversation, and the conversation as training ids with a
loss mask on those turns (the tokens instruction fine-tuning learns).

A turn's span is what the conversation gains from the assistant's message: it starts where an inference
prompt for that turn ends (after the template's assistant cue) and ends where the template's rendering of
the conversation through that message ends (its end-of-turn markup included). A conversation that opens
with an assistant message has no prompt before it: its span starts at the message's own text, so markup the
template puts first (a default system prompt, the cue) is never trained.

Found the direct way, each turn costs two renders of the conversation before it: time grows with the
square of the turns. Instead the conversation is rendered once with a marker as each message's text; the
markup between markers, matched against the real rendering, gives every message's place. The offsets of
one turn's span from its text, computed the direct way on the first turn, place all the others; the last
turn is checked the direct way too. Any template this does not fit (one that rewrites message text other
than by trimming, or whose markup differs from turn to turn) gets the direct way, same spans.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aigc.chat import ChatTemplate, Message
from aigc.errors import AigcError
from aigc.tokenizer import Tokenizer, text_pieces

_MARK, _MARK_END = "\ue000", "\ue001"  # private-use code points: no template adds or changes them


def encode_for_training(
    template: ChatTemplate, tokenizer: Tokenizer, messages: Sequence[Message]
) -> tuple[np.ndarray, np.ndarray]:
    """A whole conversation's token ids (uint32, (T,)) and, per token, whether it belongs to an assistant
    turn (bool, (T,)): the assistant's text and its end-of-turn markup."""
    text = template.render(messages, add_generation_prompt=False)
    spans = assistant_spans(template, messages, text)
    # Each piece is encoded on its own, so no token straddles a turn's edge; the prompt part ends where an
    # inference prompt ends (at the assistant's cue), and so is encoded the way generation sees it.
    ids, mask = [], []
    edges = [0, *(i for span in spans for i in span), len(text)]
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        piece = _encode(tokenizer, text[a:b]) if b > a else np.zeros(0, dtype=np.uint32)
        ids.append(piece)
        mask.append(np.full(len(piece), i % 2 == 1))  # odd pieces are the assistant's turns
    return np.concatenate(ids), np.concatenate(mask)


def _encode(tokenizer: Tokenizer, text: str) -> np.ndarray:
    """Token ids of `text`; a long text in pieces when that gives the same ids (the tokenizer's Rust side
    keeps ~250 bytes per token of the text it is given), each piece's list made an array at once."""
    pieces = text_pieces(text) if tokenizer.splits_safely else (text,)
    return np.concatenate([np.asarray(tokenizer.encode(piece), dtype=np.uint32) for piece in pieces])


def assistant_spans(template: ChatTemplate, messages: Sequence[Message], text: str) -> list[tuple[int, int]]:
    """(start, end) character offsets in `text` (the conversation rendered without a generation prompt) of
    each assistant turn, in order; an AigcError when there is none or the template hides them."""
    if not any(m.role == "assistant" for m in messages):
        raise AigcError("the conversation has no assistant message, so there is nothing to learn from it")
    spans = _spans_from_markers(template, messages, text)
    if spans is None:
        spans = [_direct_span(template, messages, text, k) for k, m in enumerate(messages) if m.role == "assistant"]
    if any(b < a for a, b in spans) or any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
        raise _not_append_only(template, next(k for k, m in enumerate(messages) if m.role == "assistant"))
    return spans


def _direct_span(template: ChatTemplate, messages: Sequence[Message], text: str, k: int) -> tuple[int, int]:
    """Turn k's span from renders of the conversation before it (with the cue) and through it."""
    if k == 0:
        return _first_span(template, messages, text)
    before = template.render(messages[:k], add_generation_prompt=True)
    through = template.render(messages[: k + 1], add_generation_prompt=False)
    if not (through.startswith(before) and text.startswith(through)):
        raise _not_append_only(template, k)
    return len(before), len(through)


def _first_span(template: ChatTemplate, messages: Sequence[Message], text: str) -> tuple[int, int]:
    """An opening assistant message has no prompt: its span starts at its own text, which is found by
    rendering it alone with a marker as its text (what comes before the marker does not depend on it)."""
    marked = template.render([Message("assistant", _marker(0))], add_generation_prompt=False)
    through = template.render(messages[:1], add_generation_prompt=False)
    head = marked.split(_marker(0), 1)[0]
    if _marker(0) not in marked or not (through.startswith(head) and text.startswith(through)):
        raise _not_append_only(template, 0)
    return len(head), len(through)


def _not_append_only(template: ChatTemplate, k: int) -> AigcError:
    return AigcError(
        f"chat template {template.origin} renders a conversation differently from its beginning, so the "
        f"assistant's turn {k} cannot be located; use a template that only appends turns"
    )


def _marker(i: int) -> str:
    return f"{_MARK}{i}{_MARK_END}"


def _spans_from_markers(template: ChatTemplate, messages: Sequence[Message], text: str) -> list[tuple[int, int]] | None:
    """Every assistant turn's span from one marked render and a few direct ones; None when the template
    does not fit (see the module's docstring), for the caller to find them the direct way."""
    places = _text_places(template, messages, text)
    if places is None:
        return None
    turns = [k for k, m in enumerate(messages) if m.role == "assistant"]
    spans = {0: _first_span(template, messages, text)} if turns[0] == 0 else {}
    later = [k for k in turns if k > 0]
    if later:
        first, last = later[0], later[-1]
        spans[first] = _direct_span(template, messages, text, first)
        if not spans[first][0] <= places[first][0] <= places[first][1] <= spans[first][1]:
            return None  # a cue that runs into the text, or a turn that ends inside it
        lead = text[spans[first][0] : places[first][0]]  # markup between the cue and the text (often none)
        tail = text[places[first][1] : spans[first][1]]  # the end-of-turn markup
        for k in later[1:]:
            start, end = places[k][0] - len(lead), places[k][1] + len(tail)
            if k == len(messages) - 1:
                end = len(text)  # the last message's rendering runs to the end, as a direct render would
            if text[start : places[k][0]] != lead or text[places[k][1] : places[k][1] + len(tail)] != tail:
                return None
            spans[k] = (start, end)
        if last != first and spans[last] != _direct_span(template, messages, text, last):
            return None
    return [spans[k] for k in turns]


def _text_places(template: ChatTemplate, messages: Sequence[Message], text: str) -> list[tuple[int, int]] | None:
    """(start, end) of each message's text in `text`, found by rendering the conversation once with a
    marker in place of each text: the markup between markers must match `text` exactly, and each text
    must sit between as given or trimmed. None when that does not hold."""
    if any(_MARK in m.content for m in messages):
        return None
    try:
        marked = template.render(
            [Message(m.role, _marker(i)) for i, m in enumerate(messages)], add_generation_prompt=False
        )
    except AigcError:
        return None
    if marked.count(_MARK) != len(messages):
        return None
    markup, rest = [], marked
    for i in range(len(messages)):
        head, found, rest = rest.partition(_marker(i))
        if not found:
            return None
        markup.append(head)
    markup.append(rest)
    places, at = [], 0
    for i, message in enumerate(messages):
        if not text.startswith(markup[i], at):
            return None
        at += len(markup[i])
        shown = _shown(message.content, text, at, markup[i + 1])
        if shown is None:
            return None
        places.append((at, at + len(shown)))
        at += len(shown)
    return places if at + len(markup[-1]) == len(text) else None


def _shown(content: str, text: str, at: int, after: str) -> str | None:
    """`content` as `text` shows it at `at`, followed by the markup `after`: as given, or trimmed."""
    if text.startswith(content, at) and text.startswith(after, at + len(content)):
        return content
    trimmed = content.strip()  # Jinja's `trim`
    if trimmed != content and text.startswith(trimmed, at) and text.startswith(after, at + len(trimmed)):
        return trimmed
    return None
