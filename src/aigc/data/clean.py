"""Cleaning: HTML tags to whitespace, Unicode NFC, control characters out, whitespace collapsed.

Line breaks carry paragraph structure, so `<br>` becomes a newline and at most one blank line is
kept between paragraphs; every other run of whitespace becomes one space. Text that merely looks
like markup ("a < b", "<3") is left alone: a tag must start with a letter right after `<`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_BREAK = re.compile(r"<\s*br\s*/?\s*>|</\s*p\s*>", re.IGNORECASE)
_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9:-]*(?:\s[^<>]*)?/?>", re.DOTALL)
_PARAGRAPHS = re.compile(r"\n{3,}")
# C0/C1 control characters except newline and tab (tab is whitespace, collapsed below), and lone
# surrogates (JSON can encode them; they are not valid text and cannot be written as UTF-8).
_CONTROLS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass
class CleanStats:
    too_short: int = 0
    too_long: int = 0
    kept: int = 0


def clean_text(text: str) -> str:
    """Return `text` without markup or control characters, NFC-normalised, whitespace collapsed."""
    if "<" in text:
        text = _BREAK.sub("\n", text)
        text = _TAG.sub(" ", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if _CONTROLS.search(text):
        text = _CONTROLS.sub("", text)
    if "\n" not in text:
        return collapse_spaces(text)
    text = "\n".join(collapse_spaces(line) for line in text.split("\n"))
    return _PARAGRAPHS.sub("\n\n", text).strip()


LONG_TEXT = 1 << 16


def collapse_spaces(text: str) -> str:
    """Runs of whitespace to one space, none at either end (`" ".join(text.split())`). That idiom is
    fast but holds a list of every word (~10x the text), so a long text goes through it a slice at
    a time, with a space between slices wherever whitespace was at the seam."""
    if len(text) <= LONG_TEXT:
        return " ".join(text.split())
    out: list[str] = []
    space_before = False  # whitespace seen since the last word written
    for start in range(0, len(text), LONG_TEXT):
        chunk = text[start : start + LONG_TEXT]
        words = " ".join(chunk.split())
        if not words:  # a slice of whitespace only
            space_before = True
            continue
        if out and (space_before or chunk[0].isspace()):
            out.append(" ")
        out.append(words)
        space_before = chunk[-1].isspace()
    return "".join(out)


class Cleaner:
    """`clean_text` plus the length filters, counting what each filter drops."""

    def __init__(self, min_chars: int, max_chars: int):
        self.min_chars = max(min_chars, 1)  # an empty document is never kept
        self.max_chars = max_chars
        self.stats = CleanStats()

    def __call__(self, text: str) -> str | None:
        """The cleaned text, or None when a length filter drops it."""
        text = clean_text(text)
        if len(text) < self.min_chars:
            self.stats.too_short += 1
            return None
        if len(text) > self.max_chars:
            self.stats.too_long += 1
            return None
        self.stats.kept += 1
        return text
