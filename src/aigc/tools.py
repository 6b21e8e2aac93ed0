"""Tool calling: function definitions, the grammar a reply obeys per `tool_choice`, and reading calls back.

A tool call is written by the model as one JSON object, `{"name": "<tool>", "arguments": {...}}`, whose
`arguments` match the tool's `parameters` schema; a grammar (aigc.structured) makes that the only
thing it can write (`required`, a named tool) or one of two things it can write (`auto`: a call, or
free text that does not start with `{`). `none` leaves the reply unconstrained.

Templates that know tools (Qwen2's: they read the `tools` variable and `tool_calls` of assistant
turns, as `transformers` passes them) render the definitions and earlier calls themselves. For a
template that does not (SmolLM2-135M's), `fallback_messages` writes the definitions into the system
turn, earlier calls as the assistant's JSON, and tool results as user turns that say whose result
they are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any

from aigc.chat import Message
from aigc.errors import AigcError
from aigc.structured import Grammar, check_grammar, json_grammar

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_JSON_OPTIONS = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False, "lenient": False}
CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON Schema for the arguments object

    def to_json(self) -> dict:
        function = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": function}


def parse_tools(raw: Any) -> tuple[Tool, ...]:
    """OpenAI's `tools` list as Tools; each parameters schema is compiled now, so a schema the engine
    cannot enforce is an AigcError naming the tool and the construct."""
    if not isinstance(raw, list) or not raw:
        raise AigcError("tools must be a non-empty list of {'type': 'function', 'function': {...}} objects")
    tools = []
    for i, item in enumerate(raw):
        function = item.get("function") if isinstance(item, dict) and item.get("type") == "function" else None
        if not isinstance(function, dict):
            raise AigcError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}}")
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise AigcError(f"tools[{i}].function.name must be 1-64 letters, digits, _ or -; got {name!r}")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        json_grammar(parameters, f"tools[{i}] ({name}) parameters")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise AigcError(f"tools[{i}].function.description must be a string")
        tools.append(Tool(name, description, parameters))
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise AigcError(f"tools must have distinct names; got {names}")
    return tuple(tools)


def choice_name(choice: Any, tools: tuple[Tool, ...]) -> str:
    """`tool_choice` as "auto" | "none" | "required" | a tool's name; anything else is an AigcError."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str) and choice in CHOICES:
        if choice != "none" and not tools:
            raise AigcError(f"tool_choice {choice!r} needs tools; send the tools list or leave tool_choice out")
        return choice
    function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise AigcError("tool_choice must be auto, none, required or {'type': 'function', 'function': {'name'}}")
    if name not in {t.name for t in tools}:
        raise AigcError(f"tool_choice names {name!r}, which is not in tools ({', '.join(t.name for t in tools)})")
    return name


def call_schema(tools: tuple[Tool, ...]) -> dict:
    """The JSON Schema of one call to any of `tools`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tool_grammar(tools: tuple[Tool, ...], choice: str, answer: dict | None = None) -> Grammar | None:
    """What the reply may be: None (free text) for `none`; a call for `required` or a named tool; for
    `auto`, a call or free text (free text cannot start with `{`, so the first character decides), or
    with `answer` (a response_format schema) a call or JSON matching `answer`."""
    if choice == "none":
        return None
    if choice != "auto":
        chosen = tools if choice == "required" else tuple(t for t in tools if t.name == choice)
        return json_grammar(call_schema(chosen), "tool call")
    schema = json.dumps({**call_schema(tools), "x-guidance": _JSON_OPTIONS})
    if answer is not None:  # the answer's schema is checked first, so its errors name it
        json_grammar(answer, "response_format")
        reply = f"%json {json.dumps({**answer, 'x-guidance': _JSON_OPTIONS})}"
    else:
        reply = "/[^{\\s][\\s\\S]*/"
    lark = f"start: call | reply\ncall: %json {schema}\nreply: {reply}\n"
    return check_grammar(Grammar(lark, "tool call"))


def read_call(text: str, tools: tuple[Tool, ...]) -> tuple[str, str] | None:
    """(name, arguments as JSON text) when `text` is one call to a known tool; None otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, dict) or set(value) != {"name", "arguments"}:
        return None
    if value["name"] not in {t.name for t in tools} or not isinstance(value["arguments"], dict):
        return None
    return value["name"], json.dumps(value["arguments"], ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Rendering for templates that do not know tools
# ---------------------------------------------------------------------------------------------


def template_knows_tools(source: str) -> bool:
    """True when a chat template reads the `tools` variable (Qwen2's does; SmolLM2-135M's does not)."""
    return re.search(r"\btools\b", source) is not None


def fallback_messages(messages: list[Message], tools: tuple[Tool, ...]) -> list[Message]:
    """The conversation with tools written into it as text, for a template that knows no tools."""
    lines = ["You can call these tools. To call one, reply with only a JSON object "
             '{"name": <tool name>, "arguments": {...}}.']  # fmt: skip
    lines += [f"- {t.name}: {t.description} Arguments: {json.dumps(t.parameters)}" for t in tools]
    out = []
    for message in messages:
        if message.role == "tool":
            out.append(Message("user", f"Result of the tool call: {message.content}"))
        elif message.tool_calls:
            calls = [json.dumps({"name": c["name"], "arguments": c["arguments"]}) for c in message.tool_calls]
            out.append(Message("assistant", "\n".join([message.content, *calls]).strip()))
        else:
            out.append(message)
    if tools and out and out[0].role == "system":
        out[0] = replace(out[0], content=out[0].content + "\n\n" + "\n".join(lines))
    elif tools:
        out.insert(0, Message("system", "\n".join(lines)))
    return out
