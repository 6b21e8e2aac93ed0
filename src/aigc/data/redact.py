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


def _is_ipv6(candidate: str) -> bool:
    groups = [g for g in re.split(r"[:.]", candidate) if g]
    if len(groups) < 2:  # "::" or "::1" carry no personal data; "a:b" is usually not an address
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    return True


def _is_ipv4(candidate: str) -> bool:
    try:
        ipaddress.IPv4Address(candidate)
    except ValueError:
        return False
    return True


def _is_card(candidate: str) -> bool:
    digits = _digits(candidate)
    return 13 <= len(digits) <= 19 and _luhn(digits)


def _is_phone(candidate: str) -> bool:
    return 7 <= len(_digits(candidate)) <= 15


# (placeholder, pattern, validator, cheap test that the text could contain a match)
_RULES = (
    ("EMAIL", _EMAIL, None, lambda text: "@" in text),
    ("IP", _IPV6, _is_ipv6, lambda text: "::" in text or text.count(":") >= 2),
    ("IP", _IPV4, _is_ipv4, lambda text: "." in text),
    ("CARD", _CARD, _is_card, None),
    ("PHONE", _PHONE, _is_phone, None),
)
_DIGIT = re.compile(r"\d")


class Redactor:
    """Replace personal data by typed placeholders, counting each type."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter({name: 0 for name in PLACEHOLDERS})
        self.documents = 0  # documents with at least one replacement

    def __call__(self, text: str) -> str:
        has_digit = _DIGIT.search(text) is not None
        if not has_digit and "@" not in text and "::" not in text:
            return text  # every pattern but e-mail and IPv6 needs a digit
        before = sum(self.counts.values())
        for name, pattern, valid, might_match in _RULES:
            if (might_match is None and not has_digit) or (might_match is not None and not might_match(text)):
                continue
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
