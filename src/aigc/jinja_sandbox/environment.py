"""The environment: a parsed template rewritten so that loops, `~`, literals and literal text go through the
budget, and every operator, call and filter charged (and estimated first where it can grow its input)."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from aigc.jinja_sandbox.budget import (
    ITEM_UNITS,
    MAX_RANGE,
    MAX_SOURCE_CHARS,
    TemplateLimitError,
    charge,
    size_of,
    spend,
    tick,
)
from aigc.jinja_sandbox.estimates import BINOPS, binop_estimate, filter_estimate, join_estimate, method_estimate

_ITER, _CONCAT, _VALUE = "_aigc_iter", "_aigc_concat", "_aigc_value"  # filters the parse step inserts


_LISTING = {"list", "join", "sort", "unique", "batch", "slice", "groupby", "dictsort", "reverse"}


def _materialize(value: Any) -> Any:
    """A generator's items as a list, each charged as it comes (so a long one stops early)."""
    if isinstance(value, (str, bytes, list, tuple, Mapping)) or not hasattr(value, "__iter__"):
        return value
    items = []
    for item in value:
        spend(ITEM_UNITS + size_of(item), "a list of a generator's items")
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
            estimate = join_estimate(value, rest[0] if rest else kwargs.get("d", ""))
        elif name in _LISTING and hasattr(value, "__len__"):
            estimate = size_of(value) + ITEM_UNITS * len(value) + (filter_estimate(name, value, rest, kwargs) or 0)
        else:
            estimate = filter_estimate(name, value, rest, kwargs)
        if estimate is None:
            return charge(func(*args, **kwargs), f"filter {name}")
        spend(estimate, f"filter {name}")  # an upper bound of the result's size, spent before it is made
        return func(*args, **kwargs)

    return guarded


@jinja2.pass_context  # never folded at compile time: it must run inside the render
def _iterate(context: Any, iterable: Any) -> Any:
    """A `for` loop's items, the deadline checked at each one."""
    for item in iterable:
        tick()
        yield item


@jinja2.pass_context
def _concat(context: Any, parts: list) -> str:
    """`a ~ b`, measured before it is made."""
    spend(sum(size_of(part) for part in parts), "the ~ operator")
    return "".join(map(str, parts))


@jinja2.pass_context
def _literal(context: Any, value: Any) -> Any:
    return charge(value, "a list or dict literal")


def _finalize(context: Any, value: Any) -> Any:
    return charge(value)


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

    intercepted_binops = frozenset(BINOPS)

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
        estimate = binop_estimate(operator_, left, right)
        if estimate is None:
            return charge(BINOPS[operator_](left, right), f"the {operator_} operator")
        spend(estimate, f"the {operator_} operator")
        return BINOPS[operator_](left, right)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # Jinja's names
        method = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        if getattr(method, "__name__", "") == "join" and args:
            args = (_materialize(args[0]), *args[1:])  # a generator's items, charged one by one, then measured
        estimate = method_estimate(method, args, kwargs)
        if estimate is None:
            return charge(super().call(__context, __obj, *args, **kwargs), "a call")
        spend(estimate, f"{getattr(method, '__name__', 'the call')}()")
        return super().call(__context, __obj, *args, **kwargs)
