"""OpenAI's structured-output fields: `response_format` (both routes), `tools` / `tool_choice` (chat).

Pure functions: each turns request fields into a grammar for the decode rows, or an ApiError (400,
OpenAI's error shape) naming the field and the construct; never a silently unconstrained decode.
`ToolCallStream` turns a row's streamed text into OpenAI's `delta.tool_calls` chunks.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from aigc.errors import AigcError
from aigc.generate import Completion
from aigc.structured import Grammar, json_grammar
from aigc.tools import Tool, choice_name, parse_tools, read_call, tool_grammar


class FieldError(AigcError):
    """A bad structured-output field; the routes answer it as a 400 naming `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message if message.startswith(param) else f"{param}: {message}")
        self.param = param


INCOMPLETE = "the JSON is incomplete: the token limit (or a stop string) ended it before it closed"


def response_grammar(raw: Any) -> Grammar | None:
    """`response_format`: text (None), `json_object` (any JSON object) or `json_schema` (that schema)."""
    spec = response_schema(raw)
    try:
        return None if spec is None else json_grammar(*spec)
    except AigcError as exc:
        raise FieldError("response_format", str(exc)) from exc


def response_schema(raw: Any) -> tuple[dict | None, str] | None:
    """`response_format` as (schema, name): None for text, (None, ...) for any JSON object."""
    kind = raw.get("type") if isinstance(raw, dict) else None
    if raw is None or kind == "text":
        return None
    if kind == "json_object":
        return None, "json_object"
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise FieldError("response_format", "json_schema must be {'name', 'schema': {...}, 'strict'}")
        return spec.get("schema", {}), str(spec.get("name", "schema"))
    raise FieldError("response_format", "type must be text, json_object or json_schema")


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[Tool, ...]
    choice: str  # auto | none | required | a tool's name
    grammar: Grammar | None


def plan_tools(raw_tools: Any, raw_choice: Any, raw_format: Any = None) -> ToolPlan | None:
    """`tools` and `tool_choice` checked (every parameters schema compiled); None without tools. With
    `auto` and a JSON `response_format`, the reply is a call or JSON of that format."""
    if raw_tools in (None, []) and raw_choice in (None, "none"):
        return None
    try:
        tools = parse_tools(raw_tools) if raw_tools not in (None, []) else ()
    except AigcError as exc:
        raise FieldError("tools", str(exc)) from exc
    try:
        choice = choice_name(raw_choice, tools)
    except AigcError as exc:
        raise FieldError("tool_choice", str(exc)) from exc
    if not tools:
        return None
    answer = response_schema(raw_format) if choice == "auto" else None
    try:
        grammar = tool_grammar(tools, choice, None if answer is None else answer[0] or {"type": "object"})
    except AigcError as exc:
        raise FieldError("response_format", str(exc)) from exc
    return ToolPlan(tools, choice, grammar)


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


def assistant_message(completion: Completion, tools: ToolPlan | None) -> tuple[dict, str]:
    """The choice's message and finish_reason: a call to a known tool becomes `tool_calls`."""
    call = read_call(completion.text, tools.tools) if tools and completion.complete else None
    if call is None:
        return {"role": "assistant", "content": completion.text}, completion.finish_reason
    name, arguments = call
    tool_call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"role": "assistant", "content": None, "tool_calls": [tool_call]}, "tool_calls"


def json_fields(completion: Completion) -> dict:
    """Extension fields of a choice decoded under a grammar: whether its JSON closed, and why not."""
    if completion.complete is None:
        return {}
    return {"json_complete": completion.complete, **({} if completion.complete else {"warning": INCOMPLETE})}


class ToolCallStream:
    """One streamed choice that may be a tool call. The grammar decides by the first character (a call
    starts with `{`); a call streams as a header delta (id, name) once `"arguments": ` is written, then
    the arguments' text as it grows, holding back the call object's own closing brace."""

    MARK = '"arguments": '

    def __init__(self, tools: ToolPlan):
        self.tools, self.text, self.mode, self.sent = tools, "", None, 0

    def feed(self, text: str) -> list[dict]:
        """Deltas for this much more text: {"content": ...} or {"tool_calls": [...]}."""
        self.text += text
        if self.mode is None and self.text.strip():
            self.mode = "call" if self.text.lstrip().startswith("{") else "text"
        if self.mode == "text":
            return self._text()
        if self.mode == "call" and self.text.lstrip().startswith('{"name": ') and self.MARK in self.text:
            return self._arguments(final=False)
        return []

    def finish(self, completion: Completion) -> tuple[list[dict], str]:
        """The last deltas and the finish_reason."""
        _, reason = assistant_message(completion, self.tools)
        if self.mode == "call" and reason == "tool_calls":
            return self._arguments(final=True), reason
        if self.mode == "call":  # cut short: what was held back goes out as text, as it is
            return [{"content": self.text}], reason
        return self._text(), reason

    def _text(self) -> list[dict]:
        new, self.sent = self.text[self.sent :], len(self.text)
        return [{"content": new}] if new else []

    def _arguments(self, *, final: bool) -> list[dict]:
        deltas = []
        start = self.text.index(self.MARK) + len(self.MARK)
        if self.sent == 0:
            name = read_name(self.text[:start])
            function = {"name": name, "arguments": ""}
            deltas.append({"tool_calls": [{"index": 0, "id": new_call_id(), "type": "function", "function": function}]})
            self.sent = start
        end = len(self.text.rstrip()) - 1 if final else len(self.text) - 1  # hold back the closing brace
        if end > self.sent:
            piece, self.sent = self.text[self.sent : end], end
            deltas.append({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        return deltas


def read_name(head: str) -> str:
    """The tool name in a call's start, `{"name": "lookup_order", "arguments": `."""
    return json.loads(head[: head.rindex(",")] + "}")["name"]
