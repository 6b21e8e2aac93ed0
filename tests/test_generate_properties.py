"""Property-based tests (hypothesis) of the sampling functions and the stop-string scanner: for any
input in the documented ranges, never NaN, never an empty candidate set, and the scanner's output
equals a naive reference however the text is split into pieces."""

from __future__ import annotations

import itertools
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigc.config import (
    MAX_REPETITION_PENALTY,
    MAX_TEMPERATURE,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    SampleConfig,
)
from aigc.errors import AigcError
from aigc.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, sample_tokens
from aigc.textstream import StopScanner, TextStream

PROPERTY = settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Logits as a model may give them: float32 up to 1e30 in size (a penalty of 100 keeps them finite), some
# masked to -inf (banned tokens), never a row without a finite value (end-of-text and ordinary tokens
# are never banned together).
LOGIT_BOUND = torch.tensor(1e30).item()  # exactly representable in float32
finite32 = st.floats(-LOGIT_BOUND, LOGIT_BOUND, width=32)
temperatures = st.one_of(st.just(0.0), st.floats(MIN_TEMPERATURE, MAX_TEMPERATURE))
top_ps = st.floats(MIN_TOP_P, 1.0)


@st.composite
def logit_rows(draw, max_rows: int = 4, max_vocab: int = 12) -> torch.Tensor:
    rows, vocab = draw(st.integers(1, max_rows)), draw(st.integers(1, max_vocab))
    values = draw(st.lists(st.lists(finite32, min_size=vocab, max_size=vocab), min_size=rows, max_size=rows))
    logits = torch.tensor(values, dtype=torch.float32)
    masked = draw(st.lists(st.lists(st.booleans(), min_size=vocab, max_size=vocab), min_size=rows, max_size=rows))
    mask = torch.tensor(masked)
    mask[:, 0] &= False  # at least one finite logit per row
    return logits.masked_fill(mask, float("-inf"))


@PROPERTY
@given(logits=logit_rows(), data=st.data())
def test_sampling_pipeline_always_picks_a_finite_candidate(logits, data):
    rows, vocab = logits.shape
    temperature = torch.tensor([[data.draw(temperatures)] for _ in range(rows)])
    top_p = torch.tensor([[data.draw(top_ps)] for _ in range(rows)])
    top_k = torch.tensor([data.draw(st.integers(0, vocab + 2)) for _ in range(rows)])
    penalty = torch.tensor([[data.draw(st.floats(1.0, MAX_REPETITION_PENALTY))] for _ in range(rows)])
    seen = torch.tensor(
        data.draw(
            st.lists(
                st.lists(st.booleans(), min_size=vocab, max_size=vocab),
                min_size=rows,
                max_size=rows,
            )
        )
    )
    uniforms = torch.tensor([data.draw(st.floats(0.0, 1.0, exclude_max=True, width=32)) for _ in range(rows)])
    processed = apply_top_p(apply_top_k(apply_repetition_penalty(logits, seen, penalty), top_k), top_p)
    assert not processed.isnan().any()
    assert processed.isfinite().any(dim=-1).all()  # every row keeps a candidate
    tokens = sample_tokens(processed, temperature, uniforms)
    assert ((0 <= tokens) & (tokens < vocab)).all()
    chosen = processed.gather(1, tokens.unsqueeze(1)).squeeze(1)
    assert chosen.isfinite().all()  # never a banned or dropped token


@PROPERTY
@given(logits=logit_rows(), p=top_ps)
def test_top_p_keeps_the_best_token_and_a_set_reaching_p(logits, p):
    kept = apply_top_p(logits, torch.full((logits.size(0), 1), p)).isfinite()
    assert kept.gather(1, logits.argmax(dim=-1, keepdim=True)).all()
    probs = logits.softmax(dim=-1)
    mass = (probs * kept).sum(dim=-1)
    assert ((mass >= p - 1e-5) | (kept.sum(dim=-1) == logits.isfinite().sum(dim=-1))).all()


@PROPERTY
@given(
    temperature=st.one_of(st.floats(allow_nan=True), st.sampled_from([1e39, float("inf"), 1e-39, -1.0])),
    top_p=st.one_of(st.floats(allow_nan=True), st.sampled_from([1e-46, 0.0, 1.5])),
)
def test_sample_config_accepts_exactly_the_documented_ranges(temperature, top_p):
    valid = (temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE) and MIN_TOP_P <= top_p <= 1
    if valid:
        SampleConfig(temperature=temperature, top_p=top_p)
    else:
        with pytest.raises(AigcError, match="must be"):
            SampleConfig(temperature=temperature, top_p=top_p)


# -- the stop-string scanner ------------------------------------------------------------------------


def reference_cut(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """Naive: read character by character; at the first position where stop strings end, cut before
    the longest of them."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return text[: end - max(map(len, ending))], True
    return text, False


def reference_held(text: str, stops: tuple[str, ...]) -> int:
    """Longest tail of `text` that is the start of some stop string."""
    return max((n for s in stops for n in range(len(s)) if n and text.endswith(s[:n])), default=0)


alphabet = st.sampled_from("ab\u597d ")  # few letters, so stop strings occur and overlap often


@PROPERTY
@given(
    text=st.text(alphabet, max_size=40),
    stops=st.lists(st.text(alphabet, min_size=1, max_size=6), min_size=1, max_size=4).map(tuple),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_stop_scanner_equals_the_naive_reference_however_the_text_is_split(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    scanner, shown = StopScanner(stops), ""
    for i, (start, end) in enumerate(itertools.pairwise(bounds)):
        last = i == len(bounds) - 2
        shown += scanner.push(text[start:end], final=last)
        if not scanner.stopped and not last:  # held back: exactly what could still start a stop string
            assert len(shown) == end - reference_held(text[:end], stops)
    if len(bounds) == 1:
        shown += scanner.push("", final=True)
    assert (shown, scanner.stopped) == reference_cut(text, stops)
    assert scanner.text == shown


@PROPERTY
@given(
    text=st.text(max_size=30),
    stops=st.lists(st.text(min_size=1, max_size=4), max_size=3).map(tuple),
    split=st.integers(0, 200),
)
def test_text_stream_utf8_pieces_equal_the_whole_text(text, stops, split):
    data = text.encode("utf-8")
    stream = TextStream(stops)
    shown = stream.push(data[: min(split, len(data))], final=False) + stream.push(data[split:], final=True)
    assert shown == reference_cut(text, stops)[0] == stream.text


def test_stop_scanner_is_linear_in_the_new_text():
    # Issue 14: 60 stop strings of 4,000 characters, 768 tokens took 38 s (every prefix re-sliced per token).
    stops = tuple(f"{i:02d}" + "x" * 3998 for i in range(60))
    pieces = ["ab"] * 384 + ["01"] + ["x"] * 382 + ["ab"]  # no match, then a long partial match, broken
    scanner = StopScanner(stops)
    started = time.perf_counter()
    shown = "".join(scanner.push(piece) for piece in pieces)
    assert time.perf_counter() - started < 1.0
    assert shown == "".join(pieces) and not scanner.stopped
