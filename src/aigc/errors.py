"""The one exception type for problems a user can fix, and the one check that text is valid UTF-8.

Library code raises `AigcError` with a message that names the bad value and the fix; `aigc.cli`
prints it as a single line on stderr and exits with code 2. Internal invariants use `assert`.
"""


class AigcError(Exception):
    """A user-facing error: bad input, missing file, invalid option. Message is one line."""


def check_text(text: str, where: str) -> str:
    """`text` if it can be written as UTF-8; else an AigcError naming `where` and the first bad character.

    A Python str can hold code points UTF-8 cannot encode (U+D800..U+DFFF): a JSON escape of half a
    UTF-16 pair (`"\\ud800"`), or a byte that was not UTF-8 in a command line, file name or terminal
    line (Python keeps byte 0xE9 as U+DCE9, "surrogateescape"). The tokenizer and every file writer
    refuse them, so text from outside is checked here, once, where it comes in."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        kind = f"the byte 0x{code - 0xDC00:02X}, not UTF-8" if 0xDC80 <= code <= 0xDCFF else "a lone surrogate"
        raise AigcError(f"{where} must be valid UTF-8 text; character {exc.start} is \\u{code:04x} ({kind})") from None
    return text
