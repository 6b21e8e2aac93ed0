import pytest

from aigc.data.redact import Redactor


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("write to jane.doe+films@example.co.uk today", "write to <EMAIL> today", "EMAIL"),
        ("call (555) 123-4567 now", "call <PHONE> now", "PHONE"),
        ("call 555-123-4567 or 1-800-555-0199", "call <PHONE> or <PHONE>", "PHONE"),
        ("ring +44 20 7946 0958.", "ring <PHONE>.", "PHONE"),
        ("appelle le 06 12 34 56 78", "appelle le <PHONE>", "PHONE"),
        ("card 4111 1111 1111 1111 expires", "card <CARD> expires", "CARD"),
        ("amex 3782-822463-10005", "amex <CARD>", "CARD"),
        ("visa 4012888888881881", "visa <CARD>", "CARD"),
        ("server 192.168.1.20 was down", "server <IP> was down", "IP"),
        ("from 2001:db8::8a2e:370:7334 and fe80::1ff:fe23:4567:890a", "from <IP> and <IP>", "IP"),
    ],
)
def test_redactor_replaces_each_kind(text, expected, kind):
    redactor = Redactor()
    assert redactor(text) == expected
    assert redactor.counts[kind] == expected.count(f"<{kind}>")
    assert redactor.documents == 1


@pytest.mark.parametrize(
    "text",
    [
        "Released 2023-01-15 (01/15/2023), set in 1999 and 1942-1945.",
        "It cost $1,299.99 or €12.50, about 1.5 million people saw it.",
        "I rate it 7/10, maybe 8.5/10; runtime 1:42:30, starts at 10:30.",
        "Version 2.0.1 of the DVD, chapter 3.2, scene 12.",
        "4111 1111 1111 1112 fails the Luhn check.",
        "Room 101, 221B Baker Street, 555 people, code 12345.",
        "C++ has std::vector and a::b, and IPv6 loopback ::1.",
        "Email me? no @ here, just an at sign @ alone.",
    ],
)
def test_redactor_leaves_ordinary_text_alone(text):
    redactor = Redactor()
    assert redactor(text) == text
    assert sum(redactor.counts.values()) == 0
    assert redactor.documents == 0


def test_redactor_counts_across_documents():
    redactor = Redactor()
    redactor("a@b.com and c@d.org")
    redactor("nothing here")
    redactor("10.0.0.1")
    assert dict(redactor.counts) == {"EMAIL": 2, "PHONE": 0, "CARD": 0, "IP": 1}
    assert redactor.documents == 2
