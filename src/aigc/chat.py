"""Chat: a run's chat template, the messages it renders, and the prompt (token ids) a chat decodes from.

An instruction-tuned run carries its Jinja chat template in `RUN/chat_template.jinja` (written by
`aigc import` from GGUF metadata or `tokenizer_config.json`, copied in by `--chat-template FILE`, or
carried over by `aigc train` from the instruction data or the base). It is rendered the way
`transformers`' `apply_chat_template` does, so the same messages give the same text: a sandboxed Jinja
environment with `trim_blocks` and `lstrip_blocks`, the loop-control extension, a `tojson` filter that
does not escape HTML, `raise_exception`, `strftime_now`, and the special tokens `bos_token` /
`eos_token` as variables. The `{% generation %}` tag is accepted (and renders its body). The template is
someone else's code: it renders within the time, size and recursion limits of `aigc.jinja_sandbox`, and
any failure of it is an AigcError (a TemplateLimitError for the limits).

Generation stops at the assistant's end-of-turn token (ChatML's `<|im_end|>`), found by rendering a
probe conversation: the first special token after the assistant's text is the one the model was taught
to end its turn with. A conversation longer than the model's context is an error, never cut.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext

from aigc.artifacts.run import CHAT_TEMPLATE, read_run_config, resolve_run_dir, save_config
from aigc.errors import AigcError, check_text
from aigc.fsutil import write_text
from aigc.jinja_sandbox import LimitedEnvironment, TemplateLimitError
from aigc.jinja_sandbox import render as render_limited
from aigc.tokenizer import EOT, Tokenizer

ROLES = ("system", "user", "assistant", "tool")
_PROBE = "\u2063probe\u2063"  # text no template adds or changes: marks where the assistant's turn ends


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant | tool
    content: str
    # Assistant turns that called tools: ({"id", "name", "arguments": dict}, ...); tool turns: the id of
    # the call they answer. Passed to templates the way `transformers` does (arguments as a dict).
    tool_calls: tuple[dict, ...] = ()
    tool_call_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


def parse_messages(raw: Any, *, where: str = "messages") -> list[Message]:
    """OpenAI-style messages (content a string or a list of {"type": "text", "text": ...} parts) as
    Messages; anything else is an AigcError naming the message and what to send instead."""
    if not isinstance(raw, (list, tuple)) or not raw:
        raise AigcError(f"{where} must be a non-empty list of {{'role', 'content'}} objects")
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise AigcError(f"{where}[{i}] must be an object with 'role' and 'content', got {type(item).__name__}")
        role = item.get("role")
        if role not in ROLES:
            raise AigcError(f"{where}[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        calls = _tool_calls(item.get("tool_calls"), f"{where}[{i}].tool_calls") if role == "assistant" else ()
        content = item.get("content")
        text = "" if content is None and calls else _text_content(content, f"{where}[{i}].content")
        call_id = item.get("tool_call_id")
        if role == "tool" and not isinstance(call_id, str):
            raise AigcError(f"{where}[{i}] is a tool result: it needs tool_call_id, the id of the call it answers")
        text = check_text(text, f"{where}[{i}].content")
        messages.append(Message(role, text, calls, call_id if role == "tool" else None))
    return messages


def _tool_calls(raw: Any, where: str) -> tuple[dict, ...]:
    """OpenAI's assistant `tool_calls` ({"id", "type": "function", "function": {"name", "arguments": JSON
    text}}) as {"id", "name", "arguments": dict}."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise AigcError(f"{where} must be a list of tool calls")
    calls = []
    for j, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise AigcError(f"{where}[{j}] must be {{'id', 'type': 'function', 'function': {{'name', 'arguments'}}}}")
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (TypeError, json.JSONDecodeError) as exc:
            raise AigcError(f"{where}[{j}].function.arguments must be a JSON object as text") from exc
        calls.append({"id": str(call.get("id", f"call_{j}")), "name": function["name"], "arguments": arguments})
    return tuple(calls)


def _text_content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise AigcError(f"{where}[{j}] is not text (type {kind!r}); this model reads text parts only")
            texts.append(part["text"])
        return "\n".join(texts)  # as vLLM joins text parts
    raise AigcError(f"{where} must be a string or a list of text parts, got {type(content).__name__}")


# ---------------------------------------------------------------------------------------------
# The template
# ---------------------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for transformers): renders its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _environment() -> LimitedEnvironment:
    env = LimitedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled chat template and the special-token strings it may refer to."""

    source: str
    bos_token: str = EOT
    eos_token: str = EOT
    origin: str = "template"  # where it came from, for error messages

    def __post_init__(self) -> None:
        if not isinstance(self.source, str):
            raise AigcError(f"chat template {self.origin} is not text ({type(self.source).__name__})")
        try:
            compiled = _environment().from_string(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise AigcError(f"chat template {self.origin} does not parse (line {exc.lineno}: {exc.message})") from exc
        except TemplateLimitError as exc:
            raise TemplateLimitError(f"chat template {self.origin} {exc}") from exc
        except (RecursionError, ValueError, MemoryError) as exc:  # nesting past the parser's limit, huge numbers
            raise AigcError(f"chat template {self.origin} does not compile ({type(exc).__name__}: {exc})") from exc
        object.__setattr__(self, "_compiled", compiled)

    def render(
        self, messages: Sequence[Message], *, add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The conversation as text, ending with the assistant's cue when `add_generation_prompt`; within
        the limits of `aigc.jinja_sandbox` (time, size, recursion), or a TemplateLimitError. `tools`:
        OpenAI function definitions, for templates that read them (as `transformers` passes them)."""
        context = {
            "messages": [m.to_json() for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "tools": tools or None,
            "documents": None,
        }
        size = sum(len(m.content) + len(m.role) for m in messages) + len(self.bos_token) + len(self.eos_token)
        # Tool definitions and calls are input the template may echo, as it echoes the messages' text.
        size += len(json.dumps(tools or [])) + sum(len(json.dumps(m.tool_calls)) for m in messages if m.tool_calls)
        try:
            return render_limited(self._compiled, context, input_chars=size)
        except TemplateLimitError as exc:
            raise TemplateLimitError(f"chat template {self.origin} {exc}") from exc
        except Exception as exc:  # the template is someone else's code: any failure of it is the template's
            message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
            if not isinstance(exc, jinja2.TemplateError):
                message = f"{type(exc).__name__}: {message}"
            message = " ".join(str(message).splitlines())  # errors are one line
            raise AigcError(f"chat template {self.origin} failed to render these messages: {message}") from exc

    def end_of_turn_ids(self, tokenizer: Tokenizer) -> tuple[int, ...]:
        """Tokens that end the assistant's turn: the first special token the template puts after the
        assistant's text (ChatML: <|im_end|>), and <|endoftext|>."""
        probe = [Message("user", "hi"), Message("assistant", _PROBE)]
        try:
            text = self.render(probe, add_generation_prompt=False)
        except TemplateLimitError:
            raise
        except AigcError:  # a template that insists on other turns (e.g. a system first): no probe
            text = ""
        after = text.split(_PROBE, 1)[1] if _PROBE in text else ""
        ends = [i for i in tokenizer.encode(after) if tokenizer.is_special(i)][:1]
        return tuple(dict.fromkeys([*ends, tokenizer.eot_id]))


def template_path(run_dir: str | Path) -> Path:
    return resolve_run_dir(run_dir) / CHAT_TEMPLATE


def load_chat_template(run_dir: str | Path) -> ChatTemplate:
    """The run's chat template; a run without one is an AigcError saying how to add one."""
    path = template_path(run_dir)
    if not path.is_file():
        raise AigcError(
            f"run {run_dir} has no chat template ({CHAT_TEMPLATE}), so it cannot chat; import an instruction-tuned "
            f"model that has one (`aigc import MODEL --out RUN`), or add one with `aigc chat {run_dir} "
            "--chat-template FILE.jinja`"
        )
    return ChatTemplate(_read_template(path), origin=str(path))


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise AigcError(f"chat template {path} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except OSError as exc:
        raise AigcError(f"cannot read chat template {path}: {exc.strerror or exc}") from None


# Conversations a template is tried on before it is stored: templates may refuse some shapes (a system
# message, turns that do not alternate) with raise_exception, so one that renders any of them is kept.
SAMPLE_CONVERSATIONS = (
    (Message("system", "s"), Message("user", "u"), Message("assistant", "a")),
    (Message("user", "u"), Message("assistant", "a"), Message("user", "u")),
    (Message("user", "u"),),
)


def check_chat_template(source: Any, origin: str) -> ChatTemplate:
    """Compile a template and render small conversations with it under the render limits; an AigcError
    (a TemplateLimitError for time, size or recursion) names what is wrong."""
    template = ChatTemplate(source, origin=origin)
    failures = []
    for conversation in SAMPLE_CONVERSATIONS:
        try:
            template.render(conversation)
            return template
        except TemplateLimitError:
            raise
        except AigcError as exc:
            failures.append(exc)
    raise AigcError(f"{failures[0]} (it renders none of the sample conversations; is it a chat template?)")


def install_chat_template(run_dir: str | Path, source: str | Path) -> Path:
    """Copy a Jinja template file into the run (checked: it must compile and render a small conversation
    within the limits). The file is replaced atomically, never written through: a symlink at the target is
    replaced by the new file and what it pointed to is left alone."""
    source = Path(source)
    if not source.is_file():
        raise AigcError(f"chat template file not found: {source}; give a Jinja file (e.g. one from tokenizer_config)")
    template = check_chat_template(_read_template(source), str(source))
    target = template_path(run_dir)
    if not target.parent.is_dir():
        raise AigcError(f"run folder not found: {target.parent}")
    if target.is_dir() and not target.is_symlink():
        raise AigcError(f"{target} is a folder; remove it to install a chat template")
    write_text(target, template.source)
    config = read_run_config(target.parent)
    source_of = {"from": "file", "path": str(source.resolve())}
    save_config(target.parent, dataclasses.replace(config, chat_template_source=source_of))
    return target


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatPrompt:
    ids: tuple[int, ...]  # the rendered conversation, encoded; generation continues from here
    stop_ids: tuple[int, ...]  # end-of-turn tokens
    text: str


def encode_chat(
    template: ChatTemplate,
    tokenizer: Tokenizer,
    messages: Sequence[Message],
    *,
    context: int | None,
    max_new_tokens: int = 0,
    tools: list[dict] | None = None,
) -> ChatPrompt:
    """Render and encode a conversation; refuse one that leaves no room for `max_new_tokens` in `context`."""
    if not messages:
        raise AigcError("messages is empty; send at least one user message")
    text = template.render(messages, tools=tools)
    ids = tuple(tokenizer.encode(text))
    if not ids:
        raise AigcError(f"chat template {template.origin} rendered these messages as empty text")
    if context is not None and len(ids) + max(max_new_tokens, 1) > context:
        over = len(ids) + max(max_new_tokens, 1) - context
        raise AigcError(
            f"the conversation is {len(ids)} tokens and {max(max_new_tokens, 1)} more are asked for, but the model's "
            f"context is {context}: {over} tokens too many; shorten the conversation or ask for fewer tokens"
        )
    return ChatPrompt(ids=ids, stop_ids=template.end_of_turn_ids(tokenizer), text=text)


def room_left(prompt_tokens: int, context: int | None, default: int) -> int:
    """How many tokens may follow a prompt of this size (at most `default`)."""
    return default if context is None else max(0, min(default, context - prompt_tokens))
