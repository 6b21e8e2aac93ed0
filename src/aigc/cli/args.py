"""Build argparse flags from config dataclasses, so each option is documented once (on its field)."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

from aigc.errors import check_text


def _base_type(annotation: Any) -> Any:
    """`int | None` -> int; `tuple[str, ...]` -> tuple; plain types unchanged."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if origin is tuple:
        return tuple
    return annotation


def text(flag: str) -> Callable[[str], str]:
    """argparse `type` of a free-text option (a prompt, a message, a stop string). A byte that is not
    UTF-8 on the command line reaches Python as a surrogate (`$'caf\\xe9'` is "caf\\udce9"), which the
    tokenizer cannot take: refused while parsing with an AigcError naming the option, that `aigc.cli.main`
    prints as one line (argparse's own errors print the whole usage first)."""
    return lambda value: check_text(value, flag)


def flag_name(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("flag") or f.name).replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    """Add one flag per field of `cls`, with its help, default and choices. Defaults stay unset
    (argparse.SUPPRESS) so that `dataclass_from_args` can tell which options a user actually gave."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__.replace("Config", "").lower() + " options")
    for f in dataclasses.fields(cls):
        if f.name in exclude or "help" not in f.metadata:
            continue
        kind = _base_type(hints[f.name])
        default = f.default
        help_text = f"{f.metadata['help']} (default: {default if default not in (None, ()) else 'none'})"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if f.metadata.get("choices"):
            kwargs["choices"] = f.metadata["choices"]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif kind is tuple:
            kwargs.update(action="append", metavar="TEXT", type=text(flag_name(f)))
        else:
            kwargs.update(type=text(flag_name(f)) if kind is str else kind, metavar=f.name.upper())
        group.add_argument(flag_name(f), **kwargs)


def given_options(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` that the user set on the command line (tuples for repeated flags)."""
    values = {}
    for f in dataclasses.fields(cls):
        if hasattr(namespace, f.name):
            value = getattr(namespace, f.name)
            values[f.name] = tuple(value) if isinstance(value, list) else value
    return values


def dataclass_from_args(namespace: argparse.Namespace, cls: type, **overrides: Any) -> Any:
    """Instantiate `cls` from parsed args; fields not given keep their dataclass defaults."""
    return cls(**{**given_options(namespace, cls), **overrides})
