"""`--json-schema FILE` / `--json-object`: the flags that constrain generate, batch and chat to JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from aigc.errors import AigcError


def add_structured_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("structured output").add_mutually_exclusive_group()
    group.add_argument(
        "--json-schema", type=Path, metavar="FILE", help="output is JSON matching this JSON Schema file (always)"
    )
    group.add_argument("--json-object", action="store_true", help="output is a JSON object (any keys)")


def grammar_from_args(args: argparse.Namespace):
    """The Grammar the flags ask for (None: free text); a missing or unenforceable schema is an AigcError."""
    if not (args.json_schema or args.json_object):
        return None
    # Deferred: llguidance and torch load only when structured output is asked for.
    from aigc.structured import json_grammar

    if args.json_object:
        return json_grammar(None)
    path: Path = args.json_schema
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AigcError(f"--json-schema file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AigcError(f"--json-schema {path} is not JSON: {exc}") from None
    return json_grammar(schema, path.name)


def json_columns(text: str, taken: set[str] = frozenset()) -> dict:
    """The fields of a generated JSON object, for `aigc batch --json-columns` (an incomplete or non-object
    text gives no fields: its row keeps the raw output only). A field named like a column in `taken`
    (the input's, `generated`) goes to `generated.NAME` instead, so it never overwrites the input."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return {}
    if not isinstance(value, dict):
        return {}
    return {
        (f"generated.{k}" if k in taken else k): v
        if isinstance(v, (str, int, float, bool)) or v is None
        else json.dumps(v)
        for k, v in value.items()
    }
