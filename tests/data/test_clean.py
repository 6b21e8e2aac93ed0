import unicodedata

import pytest

from aigc.data.clean import Cleaner, clean_text


def test_clean_text_turns_html_into_whitespace():
    text = "Great film.<br /><br />The <i>best</i> of the year<BR>really<p>new</p>"
    assert clean_text(text) == "Great film.\n\nThe best of the year\nreally new"


def test_clean_text_keeps_text_that_only_looks_like_markup():
    assert clean_text("a < b and b > c, I <3 it") == "a < b and b > c, I <3 it"


def test_clean_text_normalises_to_nfc():
    decomposed = "Cafe\u0301 Ame\u0301lie"
    cleaned = clean_text(decomposed)
    assert cleaned == "Café Amélie"
    assert unicodedata.is_normalized("NFC", cleaned)


def test_clean_text_removes_control_characters_and_lone_surrogates():
    assert clean_text("be\x00ll\x07 \x1b[0mok\x85 \ud800end") == "bell [0mok end"


def test_clean_text_collapses_whitespace_but_keeps_paragraphs():
    text = "  one\t two \u00a0 three \r\n\r\n\r\n\n  four  \r five  "
    assert clean_text(text) == "one two three\n\nfour\nfive"


@pytest.mark.parametrize("text", ["这部电影非常好看 🎬🍿", "emoji ZWJ 👩‍💻 stays", "Ünïcödé"])
def test_clean_text_leaves_unicode_text_alone(text):
    assert clean_text(text) == text


def test_cleaner_length_filters_count_what_they_drop():
    cleaner = Cleaner(min_chars=5, max_chars=10)
    results = [cleaner(t) for t in ["tiny", "just right", "   ", "far too long here", "<b>fine!</b>"]]
    assert results == [None, "just right", None, None, "fine!"]
    assert (cleaner.stats.too_short, cleaner.stats.too_long, cleaner.stats.kept) == (2, 1, 2)


def test_cleaner_never_keeps_empty_documents():
    cleaner = Cleaner(min_chars=0, max_chars=10)
    assert cleaner("<br/>  ") is None
    assert cleaner.stats.too_short == 1
