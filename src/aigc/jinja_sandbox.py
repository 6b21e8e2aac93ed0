"""A Jinja sandbox whose templates run in bounded time and memory.

A chat template is code from whoever made the model file (GGUF metadata, `tokenizer_config.json`), and
`aigc serve` renders it for every chat request. Jinja's `ImmutableSandboxedEnvironment` stops it from
reaching Python internals, but not from looping for hours (`range(100000)` inside `range(100000)`) or
building gigabytes (`'x' * 10**9`, a string doubled in a loop, `tojson(indent=10**9)`, `lipsum(10**6)`).

Here every way a template can repeat work or grow a value passes through a check, in the render's thread:

- **time**: a render has `TIME_LIMIT_S` of wall time. Only loops and calls repeat work in Jinja (no
  `while`; recursion is a macro call), so the deadline is checked at each loop item (every `for` iterable
  is wrapped when the template is parsed) and at each call, filter, operator and output. No tracing.
- **size**: a render has a budget of units (about bytes: one per character, `ITEM_UNITS` per item of a
  container, counted the way the value would be written out: a list holding one string ten times counts
  the string ten times). Each output
  piece, operator result, call or filter result, `~` concatenation and list/tuple/dict literal is
  charged as it is made; operations that can multiply their input (repetition, `center`, `indent`,
  `replace`, `join`, `format`, `tojson`'s indent, ...) are estimated *before* they run. The budget is
  `BUDGET_BASE` plus `BUDGET_PER_INPUT` per character of the conversation, so long conversations fit.
- **recursion**: Python's own limit (a RecursionError), reported like the other limits.

Every limit raises `TemplateLimitError`, an `AigcError` naming the limit.
"""

from __future__ import annotations

import functools
import json
import math
import operator
import re
import threading
import time
from collections.abc import ItemsView, KeysView, Mapping, ValuesView
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace
from jinja2.visitor import NodeTransformer

from aigc.errors import AigcError

TIME_LIMIT_S = 2.0  # a real chat template renders a long conversation in milliseconds
BUDGET_BASE = 1 << 23  # units (about bytes: a character, 8 per item of a list) a render may make
BUDGET_PER_INPUT = 64  # more units per character of the messages: templates copy the conversation a few times
ITEM_UNITS = 8  # a container holds a pointer per item; a string has a header (a 1-character one takes ~50 bytes)
MAX_SOURCE_CHARS = 256 * 1024  # real templates are a few KB (Llama 3.1 with tools: ~5 KB)
MAX_RANGE = 10_000  # longest range(); a chat template loops over messages, not over millions
MAX_INT_BITS = 4096  # largest integer an operator may make (2**4096 has 1,234 digits)
MAX_JSON_INDENT = 16  # tojson(indent=...) past this is not formatting
_ITER, _CONCAT, _VALUE = "_aigc_iter", "_aigc_concat", "_aigc_value"  # filters the parse step inserts


class TemplateLimitError(AigcError):
    """A template went past a time, size or recursion limit."""


# ---------------------------------------------------------------------------------------------
# The render's budget
# ---------------------------------------------------------------------------------------------


@dataclass
class _Budget:
    deadline: float
    left: int
    total: int


_local = threading.local()


def _budget() -> _Budget:
    """The current render's budget; outside a render (Jinja folds constant expressions when it compiles)
    a fresh one per operation, so each folded operation is still bounded."""
    current = getattr(_local, "budget", None)
    return current if current is not None else _Budget(math.inf, BUDGET_BASE, BUDGET_BASE)


def _tick() -> _Budget:
    budget = _budget()
    if time.monotonic() > budget.deadline:
        raise TemplateLimitError(f"takes more than {TIME_LIMIT_S:g} s to render (a loop that does not end?)")
    return budget


def _spend(units: int, what: str) -> None:
    """Take `units` from the render's budget (refused, and nothing taken, when they are not left)."""
    budget = _tick()
    if units > budget.total:
        raise TemplateLimitError(f"{what} would make {units:,} characters/items; the limit is {budget.total:,}")
    if units > budget.left:
        raise TemplateLimitError(f"makes more than {budget.total:,} characters/items in all (the limit); last: {what}")
    budget.left -= units


def _charge(value: Any, what: str = "the output") -> Any:
    _spend(_size(value), what)
    return value


def render(template: jinja2.Template, context: dict, *, input_chars: int) -> str:
    """Render under the limits; the budget grows with the size of the conversation (`input_chars`)."""
    total = BUDGET_BASE + BUDGET_PER_INPUT * input_chars
    previous = getattr(_local, "budget", None)
    _local.budget = _Budget(time.monotonic() + TIME_LIMIT_S, total, total)
    try:
        return template.render(context)
    except RecursionError as exc:
        raise TemplateLimitError("recurses too deeply (a macro or loop that calls itself without end?)") from exc
    except MemoryError as exc:
        raise TemplateLimitError("ran out of memory") from exc
    finally:
        _local.budget = previous


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------


class _TooBig(Exception):
    pass


def _size(value: Any, limit: int | None = None) -> int:
    """Units `value` takes written out in full: characters + 1 for text, ITEM_UNITS per item of a container
    plus the item's own units. Shared parts count each time they appear, as `str()` and `tojson` would write them;
    each distinct object is walked once. Past `limit` (default: the budget left) the count stops there."""
    if type(value) is str:  # the common case, first
        return len(value) + ITEM_UNITS
    limit = _budget().left + 1 if limit is None else limit
    try:
        return _measure(value, {}, set(), limit)
    except _TooBig:
        return limit
    except RecursionError:  # nested past Python's limit: nothing can print it anyway
        return limit


def _children(value: Any) -> Any:
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")
    if isinstance(value, Mapping):
        return [*value.keys(), *value.values()]
    if isinstance(value, (list, tuple, set, frozenset, KeysView, ValuesView, ItemsView)):
        return value
    return None


def _measure(value: Any, memo: dict[int, int], active: set[int], limit: int) -> int:
    if isinstance(value, (str, bytes)):
        return len(value) + ITEM_UNITS  # a short string is mostly its object header
    if isinstance(value, int):
        return value.bit_length() // 64 + 1
    children = _children(value)
    if children is None:  # numbers, None, ranges, macros, generators: items are charged as made
        return 1
    key = id(value)
    if key in memo:
        return memo[key]
    if key in active:  # a namespace that holds itself: printing it recurses and fails on its own
        return 1
    active.add(key)
    total = 1
    for child in children:
        total += ITEM_UNITS + _measure(child, memo, active, limit)
        if total > limit:
            raise _TooBig
    active.discard(key)
    memo[key] = total
    return total


def _largest_number(fmt: str, args: Any) -> int:
    """The widest field a format can ask for: a number written in it, or a number passed (`%*d`, `{:{}}`)."""
    written = [int(digits) for digits in re.findall(r"\d{1,12}", fmt)]
    passed = [abs(a) for a in (args if isinstance(args, (list, tuple)) else [args]) if type(a) is int]
    return max([0, *written, *passed])


def _format_estimate(fmt: str, args: Any) -> int:
    """Size of `fmt % args` or `fmt.format(*args)`: each field may hold all the arguments, padded."""
    fields = fmt.count("%") + fmt.count("{")
    return len(fmt) + fields * (_size(args) + _largest_number(fmt, args))


# ---------------------------------------------------------------------------------------------
# Operators, calls and filters
# ---------------------------------------------------------------------------------------------

_BINOPS = {"+": operator.add, "*": operator.mul, "%": operator.mod, "**": operator.pow}
_SEQUENCES = (str, bytes, list, tuple)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _binop_estimate(op: str, left: Any, right: Any) -> int | None:
    if op == "*":
        if _is_int(left) and _is_int(right):
            bits = left.bit_length() + right.bit_length()
            return None if bits <= MAX_INT_BITS else _int_too_big(bits)
        seq, times = (left, right) if _is_int(right) else (right, left)
        if _is_int(times) and isinstance(seq, _SEQUENCES):  # one header, the contents `times` over
            return _size(seq) + max(times - 1, 0) * (_size(seq) - _size(seq[:0]))
    if op == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        return _size(left) + _size(right)
    if op == "%" and isinstance(left, str):
        return _format_estimate(left, right)
    if op == "**" and _is_int(left) and _is_int(right) and right > 0 and abs(left) > 1:
        bits = right * left.bit_length()
        return None if bits <= MAX_INT_BITS else _int_too_big(bits)
    return None


def _int_too_big(bits: int) -> int:
    raise TemplateLimitError(f"makes a number of about {bits:,} bits; the limit is {MAX_INT_BITS:,}")


def _method_estimate(method: Any, args: tuple, kwargs: dict) -> int | None:
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
        return _join_estimate(args[0], owner)
    if name in ("split", "rsplit", "splitlines"):  # at most one piece per character, plus one
        return len(owner) + ITEM_UNITS * 2 * (len(owner) + 1)
    if name == "translate":
        return len(owner) * _size(args[0] if args else None)
    return None


def _join_estimate(items: list | tuple | str, separator: Any) -> int:
    return _size(items) + len(items) * len(str(separator))


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


def _filter_estimate(name: str, value: Any, args: tuple, kwargs: dict) -> int | None:
    """Size of what a built-in filter that can grow its input would make; None for the others."""
    if name == "center":
        return _size(value) + _int_arg(args, kwargs, 0, "width", 80)
    text = value if isinstance(value, str) else ""  # the filters below write other values with str() first
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        width = len(width) if isinstance(width, str) else width if _is_int(width) else 4
        lines = text.count("\n") + 1 if text else _size(value)
        return _size(value) + lines * width
    if name == "wordwrap":
        wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring") or "\n"
        return _size(value) * (1 + _size(wrap))
    if name == "replace" and len(args) >= 2 and text:
        return _replace_estimate(text, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count"))
    if name == "format":
        return _format_estimate(text, [*args, *kwargs.values()]) + _size(value)
    if name in ("batch", "slice"):
        return _size(value) + _int_arg(args, kwargs, 0, "linecount" if name == "batch" else "slices", 0)
    if name in ("tojson", "pprint"):
        return _json_estimate(value, args[0] if args else kwargs.get("indent"))
    if name == "urlize":  # each link may get the target and rel attributes
        return _size(value) * (1 + _size([*args, *kwargs.values()]))
    return None


def _json_estimate(value: Any, indent: Any) -> int:
    """JSON escapes a character into at most 6; each line is indented by depth * indent."""
    width = len(indent) if isinstance(indent, str) else indent if _is_int(indent) else 1
    if width > MAX_JSON_INDENT:
        raise TemplateLimitError(f"asks for tojson indent {width}; the limit is {MAX_JSON_INDENT}")
    units = _size(value)
    return units * 6 + units * width * _depth(value, {})


def _depth(value: Any, memo: dict[int, int]) -> int:
    """How deeply containers nest in `value` (each distinct one walked once)."""
    children = _children(value)
    if children is None or id(value) in memo:
        return memo.get(id(value), 0)
    memo[id(value)] = 1  # a cycle stops here
    memo[id(value)] = 1 + max((_depth(child, memo) for child in children), default=0)
    return memo[id(value)]


# Filters that make a list of their input's items (a string's: one per character).
_LISTING = {"list", "join", "sort", "unique", "batch", "slice", "groupby", "dictsort", "reverse"}


def _materialize(value: Any) -> Any:
    """A generator's items as a list, each charged as it comes (so a long one stops early)."""
    if isinstance(value, (str, bytes, list, tuple, Mapping)) or not hasattr(value, "__iter__"):
        return value
    items = []
    for item in value:
        _spend(ITEM_UNITS + _size(item), "a list of a generator's items")
        items.append(item)
    return items


def _guard_filter(name: str, func: Any) -> Any:
    """`func` with its result charged, and checked first when it can grow its input."""
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0  # context / eval context / environment comes first

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        value, rest = (args[skip], args[skip + 1 :]) if len(args) > skip else (None, ())
        if name in _LISTING:
            value = _materialize(value)
            args = (*args[:skip], value, *rest)
        if name == "join":
            estimate = _join_estimate(value, rest[0] if rest else kwargs.get("d", ""))
        elif name in _LISTING and hasattr(value, "__len__"):
            estimate = _size(value) + ITEM_UNITS * len(value) + (_filter_estimate(name, value, rest, kwargs) or 0)
        else:
            estimate = _filter_estimate(name, value, rest, kwargs)
        if estimate is None:
            return _charge(func(*args, **kwargs), f"filter {name}")
        _spend(estimate, f"filter {name}")  # an upper bound of the result's size, spent before it is made
        return func(*args, **kwargs)

    return guarded


@jinja2.pass_context  # never folded at compile time: it must run inside the render
def _iterate(context: Any, iterable: Any) -> Any:
    """A `for` loop's items, the deadline checked at each one."""
    for item in iterable:
        _tick()
        yield item


@jinja2.pass_context
def _concat(context: Any, parts: list) -> str:
    """`a ~ b`, measured before it is made."""
    _spend(sum(_size(part) for part in parts), "the ~ operator")
    return "".join(map(str, parts))


@jinja2.pass_context
def _literal(context: Any, value: Any) -> Any:
    return _charge(value, "a list or dict literal")


def _finalize(context: Any, value: Any) -> Any:
    return _charge(value)


def _range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise TemplateLimitError(f"asks for range() of {len(numbers):,} numbers; the limit is {MAX_RANGE:,}")
    return numbers


def _tojson(value: Any, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, > and & for HTML; chat templates expect plain JSON (as transformers').
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# ---------------------------------------------------------------------------------------------
# The environment
# ---------------------------------------------------------------------------------------------


class _Instrument(NodeTransformer):
    """Rewrites a parsed template so that loops, `~` and literals go through the checks above, and
    literal text goes through `finalize` (Jinja writes it out unchecked otherwise)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _call(_ITER, node.iter)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _call(_CONCAT, nodes.List(node.nodes, lineno=node.lineno))

    def visit_List(self, node: nodes.Node) -> nodes.Node:
        self.generic_visit(node)
        return _call(_VALUE, node)

    visit_Dict = visit_List

    def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
        self.generic_visit(node)
        return _call(_VALUE, node) if node.ctx == "load" else node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            nodes.Const(n.data, lineno=n.lineno) if isinstance(n, nodes.TemplateData) else n for n in node.nodes
        ]
        return node


def _call(filter_name: str, node: nodes.Expr) -> nodes.Filter:
    return nodes.Filter(node, filter_name, [], [], None, None, lineno=node.lineno)


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    """`ImmutableSandboxedEnvironment` with the time and size limits above (render with `render`)."""

    intercepted_binops = frozenset(_BINOPS)

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=jinja2.pass_context(_finalize), **options)
        self.globals.pop("lipsum", None)  # lorem ipsum has no place in a chat prompt, and lipsum(10**6) is 2 GB
        self.globals["range"] = _range
        self.filters["tojson"] = _tojson
        self.filters = {name: _guard_filter(name, func) for name, func in self.filters.items()}
        self.filters.update({_ITER: _iterate, _CONCAT: _concat, _VALUE: _literal})

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        if len(source) > MAX_SOURCE_CHARS:
            raise TemplateLimitError(f"is {len(source):,} characters long; the limit is {MAX_SOURCE_CHARS:,}")
        tree = _Instrument().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree

    def call_binop(self, context: Any, operator_: str, left: Any, right: Any) -> Any:
        estimate = _binop_estimate(operator_, left, right)
        if estimate is None:
            return _charge(_BINOPS[operator_](left, right), f"the {operator_} operator")
        _spend(estimate, f"the {operator_} operator")
        return _BINOPS[operator_](left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # Jinja's names
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if getattr(method, "__name__", "") == "join" and args and not isinstance(args[0], (list, tuple, str)):
            args = (list(args[0]), *args[1:])  # a generator's items are made (and charged) here, then measured
        estimate = _method_estimate(method, args, kwargs)
        if estimate is None:
            return _charge(super().call(__context, __obj, *args, **kwargs), "a call")
        _spend(estimate, f"{getattr(method, '__name__', 'the call')}()")
        return super().call(__context, __obj, *args, **kwargs)
