"""Long documents are processed in slices (bounded memory); the results equal those of one pass."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aigc.data import clean, dedup
from aigc.tokenizer import Tokenizer, text_pieces

TEXT = st.text(alphabet=st.sampled_from(list("ab1 \n\t\u00a0\u3000é猫.,'s")), max_size=400)


@settings(max_examples=200, deadline=None)
@given(text=TEXT, size=st.integers(1, 40))
def test_collapse_spaces_in_slices_equals_split_join(text, size):
    old, clean.LONG_TEXT = clean.LONG_TEXT, size
    try:
        assert clean.collapse_spaces(text) == " ".join(text.split())
    finally:
        clean.LONG_TEXT = old


@settings(max_examples=200, deadline=None)
@given(text=TEXT, size=st.integers(1, 40))
def test_text_pieces_cover_the_text_and_encode_like_it(tiny_tokenizer, text, size):
    pieces = list(text_pieces(text, size))
    assert "".join(pieces) == text
    assert tiny_tokenizer.splits_safely
    assert sum((tiny_tokenizer.encode(p) for p in pieces), []) == tiny_tokenizer.encode(text)


def test_tokenizer_trained_on_a_long_line_equals_one_trained_on_its_pieces(reviews):
    text = " ".join(t for t, _ in reviews)
    whole = Tokenizer.train([text], vocab_size=400)  # trained in pieces inside
    pieces = Tokenizer.train(list(text_pieces(text, 64)), vocab_size=400)
    assert whole.hf.to_str() == pieces.hf.to_str()


@settings(max_examples=60, deadline=None)
@given(texts=st.lists(TEXT, min_size=1, max_size=4), piece=st.integers(4, 64), chunk=st.integers(1, 16))
def test_minhash_in_pieces_and_chunks_equals_one_pass(texts, piece, chunk):
    one_pass = dedup.MinHasher().signatures(texts)
    old = dedup.PIECE_BYTES, dedup.SHINGLE_CHUNK
    dedup.PIECE_BYTES, dedup.SHINGLE_CHUNK = piece, chunk
    try:
        sliced = dedup.MinHasher().signatures(texts)
    finally:
        dedup.PIECE_BYTES, dedup.SHINGLE_CHUNK = old
    np.testing.assert_array_equal(sliced, one_pass)
