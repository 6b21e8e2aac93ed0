"""The budget of one render: its deadline and the units it may still make, and how values are sized."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import ItemsView, KeysView, Mapping, ValuesView
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.utils import Namespace

from aigc.errors import AigcError

TIME_LIMIT_S = 2.0  # a real chat template renders a long conversation in milliseconds
BUDGET_BASE = 1 << 23  # units (about bytes: a character, 8 per item of a list) a render may make
BUDGET_PER_INPUT = 64  # more units per character of the messages: templates copy the conversation a few times
ITEM_UNITS = 8  # a container holds a pointer per item; a string has a header (a 1-character one takes ~50 bytes)
MAX_SOURCE_CHARS = 256 * 1024  # real templates are a few KB (Llama 3.1 with tools: ~5 KB)
MAX_RANGE = 10_000  # longest range(); a chat template loops over messages, not over millions
MAX_INT_BITS = 4096  # largest integer an operator may make (2**4096 has 1,234 digits)
MAX_JSON_INDENT = 16  # tojson(indent=...) past this is not formatting


class TemplateLimitError(AigcError):
    """A template went past a time, size or recursion limit."""


# ---------------------------------------------------------------------------------------------
# The render's budget
# ---------------------------------------------------------------------------------------------


@dataclass
class _Budget:
    deadline: float  # time.monotonic()
    left: int  # units
    total: int
    seconds: float = TIME_LIMIT_S


_local = threading.local()


def current_budget() -> _Budget:
    """The current render's budget; outside a render (Jinja folds constant expressions when it compiles)
    a fresh one per operation, so each folded operation is still bounded."""
    current = getattr(_local, "budget", None)
    return current if current is not None else _Budget(math.inf, BUDGET_BASE, BUDGET_BASE)


def tick() -> _Budget:
    budget = current_budget()
    if time.monotonic() > budget.deadline:
        raise TemplateLimitError(f"takes more than {budget.seconds:g} s to render (a loop that does not end?)")
    return budget


def spend(units: int, what: str) -> None:
    """Take `units` from the render's budget (refused, and nothing taken, when they are not left)."""
    budget = tick()
    if units > budget.total:
        raise TemplateLimitError(f"{what} would make about {units:,} bytes; the limit is {budget.total:,}")
    if units > budget.left:
        raise TemplateLimitError(f"makes more than {budget.total:,} bytes in all (the limit); last: {what}")
    budget.left -= units


def charge(value: Any, what: str = "the output") -> Any:
    spend(size_of(value), what)
    return value


def render(template: jinja2.Template, context: dict, *, input_chars: int) -> str:
    """Render under the limits; the budget grows with the size of the conversation (`input_chars`)."""
    total = BUDGET_BASE + BUDGET_PER_INPUT * input_chars
    previous = getattr(_local, "budget", None)
    _local.budget = _Budget(time.monotonic() + TIME_LIMIT_S, total, total, TIME_LIMIT_S)
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


def size_of(value: Any, limit: int | None = None) -> int:
    """Units `value` takes written out in full: characters + 1 for text, ITEM_UNITS per item of a container
    plus the item's own units. Shared parts count each time they appear, as `str()` and `tojson` would write them;
    each distinct object is walked once. Past `limit` (default: the budget left) the count stops there."""
    if type(value) is str:  # the common case, first
        return len(value) + ITEM_UNITS
    limit = current_budget().left + 1 if limit is None else limit
    try:
        return _measure(value, {}, set(), limit)
    except _TooBig:
        return limit
    except RecursionError:  # nested past Python's limit: nothing can print it anyway
        return limit


def children_of(value: Any) -> Any:
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
    children = children_of(value)
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


def depth_of(value: Any, memo: dict[int, int]) -> int:
    """How deeply containers nest in `value` (each distinct one walked once)."""
    children = children_of(value)
    if children is None or id(value) in memo:
        return memo.get(id(value), 0)
    memo[id(value)] = 1  # a cycle stops here
    memo[id(value)] = 1 + max((depth_of(child, memo) for child in children), default=0)
    return memo[id(value)]
