"""`aigc chat RUN`: talk to an instruction-tuned run in the terminal, or send one `--message`.

Interactive: the answer streams token by token; the conversation is kept (and rendered with the run's
chat template each turn). Commands: /reset (forget the turns, keep the system prompt), /system TEXT,
/save FILE (the conversation as one OpenAI fine-tuning JSONL line), /help. Ctrl-C stops the current
answer (what was written so far stays in the conversation); Ctrl-D quits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from aigc.cli.args import add_dataclass_args, dataclass_from_args, text
from aigc.cli.generate import add_run_args, load
from aigc.cli.structured import add_structured_args, grammar_from_args
from aigc.config import SampleConfig
from aigc.errors import AigcError, check_text
from aigc.fsutil import write_text

HELP = "commands: /reset  /system TEXT  /save FILE  /help   Ctrl-C stops an answer, Ctrl-D quits"
PROMPT = "you> "


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "chat",
        help="chat with an instruction-tuned run (interactive, or one --message)",
        description=(
            "Chat with RUN through its chat template. Without --message: an interactive session "
            f"({HELP}). With --message: print one answer on standard output and exit."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_args(parser)
    parser.add_argument("--message", type=text("--message"), help="send this one message, print the answer and exit")
    parser.add_argument(
        "--system", type=text("--system"), help="system prompt (the instruction the whole conversation follows)"
    )
    parser.add_argument(
        "--chat-template", type=Path, metavar="FILE", help="copy this Jinja chat template into RUN first (kept)"
    )
    add_dataclass_args(parser, SampleConfig, exclude=("logprobs",))
    add_structured_args(parser)
    parser.set_defaults(handler=handle)


class Session:
    """A conversation with a loaded run: its messages and one streamed answer at a time."""

    def __init__(self, run, template, config: SampleConfig, system: str | None, grammar=None):
        # Deferred: a slow import (torch) that only this path needs.
        from aigc.chat import Message

        self.run, self.template, self.config = run, template, config
        self.grammar = grammar  # every answer is JSON of this grammar (--json-schema / --json-object)
        self.system = [Message("system", system)] if system else []
        self.turns: list = []
        self._message = Message

    @property
    def messages(self) -> list:
        return self.system + self.turns

    def answer(self, text: str, write) -> str:
        """Add the user's message, stream the answer through `write`, keep it; Ctrl-C stops early."""
        # Deferred: slow imports (torch) that only this path needs.
        from aigc.chat import encode_chat, room_left
        from aigc.generate import Request, context_limit, decode_stream

        context = context_limit(self.run.model)
        messages = [*self.messages, self._message("user", text)]
        prompt = encode_chat(self.template, self.run.tokenizer, messages, context=context, max_new_tokens=1)
        max_new = room_left(len(prompt.ids), context, self.config.max_new_tokens)
        config = dataclasses.replace(self.config, max_new_tokens=max_new)  # never past the context
        request = Request(prompt_ids=prompt.ids, stop_ids=prompt.stop_ids, config=config, grammar=self.grammar)
        stream = decode_stream(self.run.model, self.run.tokenizer, [request])
        parts = []
        try:
            for event in stream:
                parts.append(event.text)
                write(event.text)
        except KeyboardInterrupt:
            stream.close()
            write(" [stopped]")
        reply = "".join(parts)
        self.turns += [self._message("user", text), self._message("assistant", reply)]
        return reply

    def save(self, path: Path) -> None:
        """Write the conversation to `path`; a path that cannot be written is an AigcError (the session
        and its conversation go on)."""
        if path.is_dir():
            raise AigcError(f"{path} is a folder; give a file name, e.g. /save {path / 'chat.jsonl'}")
        record = {"messages": [m.to_json() for m in self.messages]}
        try:
            write_text(path, json.dumps(record, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise AigcError(f"cannot save to {path} ({exc.strerror or exc}); the conversation is kept") from None


def handle(args: argparse.Namespace) -> int:
    # Deferred: slow imports (torch) that only this path needs.
    from aigc.chat import install_chat_template, load_chat_template

    config = dataclass_from_args(args, SampleConfig)
    if args.chat_template is not None:
        install_chat_template(args.run, args.chat_template)
    template = load_chat_template(args.run)  # before loading weights: a run without one fails fast
    grammar = grammar_from_args(args)
    session = Session(load(args), template, config, args.system, grammar)
    if args.message is not None:
        session.answer(args.message, _write)
        sys.stdout.write("\n")
        return 0
    # Deferred: only the interactive session wants it; line editing, and input() then sees Ctrl-C at once.
    import readline  # noqa: F401

    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8 come in as surrogates, whatever the locale,
        sys.stdin.reconfigure(errors="surrogateescape")  # and `_turn` refuses that line, not the session
    print(f"aigc chat: {args.run}; {HELP}", file=sys.stderr)
    while True:
        try:
            if not _turn(session):
                return 0
        except KeyboardInterrupt:  # Ctrl-C between answers (at the prompt, or while a command runs)
            sys.stdout.write("\n")


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _turn(session: Session) -> bool:
    """Read one line and act on it; False when the user quits (Ctrl-D)."""
    try:
        line = input(PROMPT)
    except EOFError:
        sys.stdout.write("\n")
        return False
    try:
        _act(session, check_text(line, "the line read from standard input").strip())
    except AigcError as exc:
        print(f"aigc chat: error: {exc}", file=sys.stderr, flush=True)
    return True


def _act(session: Session, line: str) -> None:
    if not line:
        return
    command, _, rest = line.partition(" ")
    if command == "/reset":
        session.turns = []
        print("(conversation cleared)", flush=True)
    elif command == "/system":
        session.system = [session._message("system", rest.strip())] if rest.strip() else []
        print(f"(system prompt {'set' if rest.strip() else 'removed'})", flush=True)
    elif command == "/save":
        if not rest.strip():
            raise AigcError("/save needs a file name: /save FILE.jsonl")
        session.save(Path(rest.strip()))
        print(f"(saved {len(session.messages)} messages to {rest.strip()})", flush=True)
    elif command == "/help":
        print(HELP, flush=True)
    elif command.startswith("/") and command[1:].isalpha():
        raise AigcError(f"unknown command {command}; {HELP}")
    else:
        session.answer(line, _write)
        sys.stdout.write("\n")
        sys.stdout.flush()
