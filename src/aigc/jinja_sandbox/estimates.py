"""Upper bounds of what an operation would make, computed before it runs (repetition, padding, joins,
formats, JSON): an operation that could multiply its input is refused before it allocates."""

from __future__ import annotations

import operator
import re
from typing import Any

from aigc.jinja_sandbox.budget import (
    ITEM_UNITS,
    MAX_INT_BITS,
    MAX_JSON_INDENT,
    TemplateLimitError,
    depth_of,
    size_of,
)


def _largest_number(fmt: str, args: Any) -> int:
    """The widest field a format can ask for: a number written in it, or a number passed (`%*d`, `{:{}}`)."""
    written = [int(digits) for digits in re.findall(r"\d{1,12}", fmt)]
    passed = [abs(a) for a in (args if isinstance(args, (list, tuple)) else [args]) if type(a) is int]
    return max([0, *written, *passed])


def _format_estimate(fmt: str, args: Any) -> int:
    """Size of `fmt % args` or `fmt.format(*args)`: each field may hold all the arguments, padded."""
    fields = fmt.count("%") + fmt.count("{")
    return len(fmt) + fields * (size_of(args) + _largest_number(fmt, args))


# ---------------------------------------------------------------------------------------------
# Operators, calls and filters
# ---------------------------------------------------------------------------------------------

BINOPS = {"+": operator.add, "*": operator.mul, "%": operator.mod, "**": operator.pow}
_SEQUENCES = (str, bytes, list, tuple)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def binop_estimate(op: str, left: Any, right: Any) -> int | None:
    if op == "*":
        if _is_int(left) and _is_int(right):
            bits = left.bit_length() + right.bit_length()
            return None if bits <= MAX_INT_BITS else _int_too_big(bits)
        seq, times = (left, right) if _is_int(right) else (right, left)
        if _is_int(times) and isinstance(seq, _SEQUENCES):  # one header, the contents `times` over
            return size_of(seq) + max(times - 1, 0) * (size_of(seq) - size_of(seq[:0]))
    if op == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        return size_of(left) + size_of(right)
    if op == "%" and isinstance(left, str):
        return _format_estimate(left, right)
    if op == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        bits = right * left.bit_length()
        return None if bits <= MAX_INT_BITS else _int_too_big(bits)
    return None


def _int_too_big(bits: int) -> int:
    raise TemplateLimitError(f"makes a number of about {bits:,} bits; the limit is {MAX_INT_BITS:,}")


def method_estimate(method: Any, args: tuple, kwargs: dict) -> int | None:
    """Size of what a text method that can grow its input would make; None for the others."""
    owner, name = getattr(method, "__self__", None), getattr(method, "__name__", "")
    if name in ("format", "format_map") and isinstance(owner, str):
        return _format_estimate(owner, [*args, *kwargs.values()])
    if _is_int(owner) and name == "to_bytes":
        return _int_arg(args, kwargs, 0, "length", 1)
    if not isinstance(owner, (str, bytes)):
        return None
    if name in ("center", "ljust", "rjust", "zfill"):
        return len(owner) + _int_arg(args, kwargs, 0, "width", 0)
    if name == "expandtabs":
        return len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t") * _int_arg(
            args, kwargs, 0, "tabsize", 8
        )
    if name == "replace" and len(args) >= 2:
        return _replace_estimate(owner, args[0], args[1], args[2] if len(args) > 2 else -1)
    if name == "join" and args and isinstance(args[0], (list, tuple)):
        return join_estimate(args[0], owner)
    if name in ("split", "rsplit", "splitlines"):  # at most one piece per character, plus one
        return len(owner) + ITEM_UNITS * 2 * (len(owner) + 1)
    if name == "translate":
        return len(owner) * size_of(args[0] if args else None)
    return None


def join_estimate(items: list | tuple | str, separator: Any) -> int:
    return size_of(items) + len(items) * len(str(separator))


def _int_arg(args: tuple, kwargs: dict, index: int, name: str, default: int) -> int:
    value = args[index] if len(args) > index else kwargs.get(name, default)
    return value if _is_int(value) else default


def _replace_estimate(text: Any, old: Any, new: Any, count: Any) -> int | None:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return None
    found = len(text) + 1 if old == "" else text.count(old)
    if _is_int(count) and count >= 0:
        found = min(found, count)
    return len(text) + found * len(new)


def filter_estimate(name: str, value: Any, args: tuple, kwargs: dict) -> int | None:
    """Size of what a built-in filter that can grow its input would make; None for the others."""
    if name == "center":
        return size_of(value) + _int_arg(args, kwargs, 0, "width", 80)
    text = value if isinstance(value, str) else ""  # the filters below write other values with str() first
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else width if _is_int(width) else 4
        lines = text.count("\n") + 1 if text else size_of(value)
        return size_of(value) + lines * width
    if name == "wordwrap":
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring") or "\n"
        return size_of(value) * (1 + size_of(wrap))
    if name == "replace" and len(args) >= 2 and text:
        return _replace_estimate(text, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count"))
    if name == "format":
        return _format_estimate(text, [*args, *kwargs.values()]) + size_of(value)
    if name in ("batch", "slice"):
        return size_of(value) + _int_arg(args, kwargs, 0, "linecount" if name == "batch" else "slices", 0)
    if name in ("tojson", "pprint"):
        return _json_estimate(value, args[0] if args else kwargs.get("indent"))
    if name == "urlize":  # each link may get the target and rel attributes
        return size_of(value) * (1 + size_of([*args, *kwargs.values()]))
    return None


def _json_estimate(value: Any, indent: Any) -> int:
    """JSON escapes a character into at most 6; each line is indented by depth * indent."""
    width = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 1
    if width > MAX_JSON_INDENT:
        raise TemplateLimitError(f"asks for tojson indent {width}; the limit is {MAX_JSON_INDENT}")
    units = size_of(value)
    return units * 6 + units * width * depth_of(value, {})
