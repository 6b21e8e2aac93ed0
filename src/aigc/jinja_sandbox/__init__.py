"""A Jinja sandbox whose templates run in bounded time and memory.

A chat template is code from whoever made the model file (GGUF metadata, `tokenizer_config.json`), and
`aigc serve` renders it for every chat request. Jinja's `ImmutableSandboxedEnvironment` stops it from
reaching Python internals, but not from looping for hours (`range(100000)` inside `range(100000)`) or
building gigabytes (`'x' * 10**9`, a string doubled in a loop, `tojson(indent=10**9)`, `lipsum(10**6)`).

Here every way a template can repeat work or grow a value passes through a check, in the render's thread:

- **time**: a render has `TIME_LIMIT_S` of wall time. Only loops and calls repeat work in Jinja (no
  `while`; recursion is a macro call), so the deadline is checked at each loop item (every `for` iterable
  is wrapped when the template is parsed) and at each call, filter, operator and output. No tracing.
- **size**: a render has a budget of units (about bytes: one per character, `ITEM_UNITS` more per string
  and per item of a container, counted the way the value would be written out: a list holding one string
  ten times counts the string ten times). Each output piece, operator result, call or filter result, `~`
  concatenation and list/tuple/dict literal is charged as it is made; operations that can multiply their
  input (repetition, `center`, `indent`, `replace`, `join`, `split`, `format`, `tojson`'s indent, ...) are
  estimated *before* they run. The budget is `BUDGET_BASE` plus `BUDGET_PER_INPUT` per character of the
  conversation, so long conversations fit. It counts what a render makes, not what is alive at once:
  memory stays a small multiple of it, and a prompt built by copying a growing string pays each copy.
- **recursion**: Python's own limit (a RecursionError), reported like the other limits.

Every limit raises `TemplateLimitError`, an `AigcError` naming the limit. `budget.py` holds the limits,
the render's budget and how values are sized; `estimates.py` the bounds computed before an operation
runs; `environment.py` the environment that routes everything through them.
"""

from __future__ import annotations

from aigc.jinja_sandbox.budget import (
    BUDGET_BASE,
    BUDGET_PER_INPUT,
    ITEM_UNITS,
    MAX_INT_BITS,
    MAX_JSON_INDENT,
    MAX_RANGE,
    MAX_SOURCE_CHARS,
    TIME_LIMIT_S,
    TemplateLimitError,
    render,
)
from aigc.jinja_sandbox.environment import LimitedEnvironment

__all__ = [
    "BUDGET_BASE",
    "BUDGET_PER_INPUT",
    "ITEM_UNITS",
    "MAX_INT_BITS",
    "MAX_JSON_INDENT",
    "MAX_RANGE",
    "MAX_SOURCE_CHARS",
    "TIME_LIMIT_S",
    "LimitedEnvironment",
    "TemplateLimitError",
    "render",
]
