"""Personal-data redaction: e-mail addresses, phone numbers, payment cards and IP addresses.

Each match is replaced by a typed placeholder (`<EMAIL>`, `<PHONE>`, `<CARD>`, `<IP>`) and counted.
The patterns are deliberately narrow so ordinary text survives: a card must pass the Luhn check and
start like a real card (2-6), an IP must parse with `ipaddress`, and a phone number needs the shape
of one (a leading `+`, or area code + 3 + 4 digits, or a leading 0 with grouped digits). Dates
(2023-01-15, 01/15/2023), years, prices ($1,299.99) and ratings (7/10) match none of them.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

PLACEHOLDERS = ("EMAIL", "PHONE", "CARD", "IP")

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}\b"
)
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|\d{1,3}(?:\.\d{1,3}){3})?(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])\d{1,3}(?:\.\d{1,3}){3}(?![\w]|\.\d)")
# 13-19 digits, optionally grouped by single spaces or hyphens; validated by `_luhn` below.
_CARD = re.compile(r"(?<![\w-])[2-6]\d{3}(?:[ -]?\d){9,15}(?![\w-])")
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"  # international: +44 20 7946 0958, +1-800-555-0199
    r"|(?:1[ .-])?(?:\(\d{3}\) ?|\d{3}[ .-])\d{3}[ .-]\d{4}"  # North American: (555) 123-4567, 555.123.4567
    r"|0\d{1,4}(?:[ .]\d{2,4}){2,4}"  # national with trunk 0: 020 7946 0958, 06 12 34 56 78
    r")(?![\w])"
)


def _luhn(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _digits(text: str) -> str:
    return "".join(ch for ch in text if ch.isdigit())


def _parses_as(kind: type, candidate: str) -> bool:
    try:
        kind(candidate)
    except ValueError:
        return False
    return True


def _is_ipv6(candidate: str) -> bool:
    groups = [g for g in re.split(r"[:.]", candidate) if g]
    # "::1" carries no personal data and "a::b" is more likely C++ than an address: ask for two
    # groups and five hex digits, which every routable address written in text has.
    return len(groups) >= 2 and sum(map(len, groups)) >= 5 and _parses_as(ipaddress.IPv6Address, candidate)


def _is_ipv4(candidate: str) -> bool:
    return _parses_as(ipaddress.IPv4Address, candidate)


def _is_card(candidate: str) -> bool:
    digits = _digits(candidate)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _is_phone(candidate: str) -> bool:
    return 7 <= len(_digits(candidate)) <= 15


# Cheap tests, each one regex scan or less, that a text could hold a match; the full patterns are
# slow to scan (lookbehinds defeat the regex engine's prefix search), so they run only when needed.
_NUMBERISH = re.compile(r"\d[\d .()/-]{5,}\d")  # 7+ characters of digits and separators
_COLON_PAIR = re.compile(r":[0-9A-Fa-f]{0,4}:")


def _might_hold_email(text: str) -> bool:
    return "@" in text


def _might_hold_ipv6(text: str) -> bool:
    return ":" in text and _COLON_PAIR.search(text) is not None


def _might_hold_number(text: str) -> bool:
    return _NUMBERISH.search(text) is not None


# (placeholder, pattern, validator, prefilter)
_RULES = (
    ("EMAIL", _EMAIL, None, _might_hold_email),
    ("IP", _IPV6, _is_ipv6, _might_hold_ipv6),
    ("IP", _IPV4, _is_ipv4, _might_hold_number),
    ("CARD", _CARD, _is_card, _might_hold_number),
    ("PHONE", _PHONE, _is_phone, _might_hold_number),
)


class Redactor:
    """Replace personal data by typed placeholders, counting each type."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter({name: 0 for name in PLACEHOLDERS})
        self.documents = 0  # documents with at least one replacement

    def __call__(self, text: str) -> str:
        before = sum(self.counts.values())
        verdicts: dict = {}
        for name, pattern, valid, might_match in _RULES:
            if might_match not in verdicts:  # the number prefilter is shared by three rules
                verdicts[might_match] = might_match(text)
            if verdicts[might_match]:
                text = pattern.sub(self._replacer(name, valid), text)
        if sum(self.counts.values()) > before:
            self.documents += 1
        return text

    def _replacer(self, name: str, valid):
        placeholder = f"<{name}>"

        def replace(match: re.Match) -> str:
            if valid is not None and not valid(match.group()):
                return match.group()
            self.counts[name] += 1
            return placeholder

        return replace
