"""`aigc chat`: one-shot --message, and the interactive session driven through a pseudo-terminal
(the stdlib `pty`): streaming answers, /system, /save, /reset, Ctrl-C and Ctrl-D."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import subprocess
import sys
import termios
import time
from pathlib import Path

from aigc.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"


def _controlling_terminal() -> None:
    """In the child: a new session whose controlling terminal is the pty, so Ctrl-C sends SIGINT."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class Terminal:
    """`aigc chat ...` in a child process whose stdin/stdout/stderr are a pseudo-terminal."""

    def __init__(self, *args: str):
        self.master, slave = pty.openpty()
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aigc", "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            preexec_fn=_controlling_terminal,
        )
        os.close(slave)
        self.seen = ""

    def expect(self, text: str, timeout: float = 60) -> str:
        """Read until `text` has appeared after what earlier expects consumed; return what came before it."""
        deadline = time.monotonic() + timeout
        while text not in self.seen:
            ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"timed out waiting for {text!r}; the terminal shows:\n{self.seen}")
            try:
                chunk = os.read(self.master, 4096).decode("utf-8", "replace")
            except OSError:  # the child closed the terminal
                raise AssertionError(f"exited before {text!r}; the terminal shows:\n{self.seen}") from None
            self.seen += chunk.replace("\r\n", "\n")
        before, _, self.seen = self.seen.partition(text)
        return before

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> int:
        """Wait for the child to exit, reading what it still writes so it never blocks on a full terminal."""
        deadline = time.monotonic() + 30
        while self.proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.1)
            if ready:
                try:
                    self.seen += os.read(self.master, 4096).decode("utf-8", "replace")
                except OSError:  # the child closed the terminal
                    break
        code = self.proc.wait(max(1.0, deadline - time.monotonic()))
        os.close(self.master)
        return code


def test_interactive_chat_keeps_history_and_obeys_commands(terminal, make_chat_run, tmp_path):
    run = make_chat_run()
    term = terminal(str(run), "--seed", "1", "--max-new-tokens", "8", "--system", "be kind")
    term.expect("you> ")
    term.send("a wonderful film\n")
    answer = term.expect("you> ").split("a wonderful film\n", 1)[1].strip()
    term.send(f"/save {tmp_path / 'one.jsonl'}\n")
    term.expect("(saved 3 messages")
    saved = json.loads((tmp_path / "one.jsonl").read_text())["messages"]
    assert [m["role"] for m in saved] == ["system", "user", "assistant"]
    assert saved[0]["content"] == "be kind" and saved[1]["content"] == "a wonderful film"
    assert saved[2]["content"].strip() == answer  # what was streamed is what the history keeps
    term.send("/system be brief\n")
    term.expect("(system prompt set)")
    term.send("/reset\n")
    term.expect("(conversation cleared)")
    term.send("/nonsense\n")
    term.expect("unknown command /nonsense")
    term.send(f"/save {tmp_path / 'two.jsonl'}\n")
    term.expect("(saved 1 messages")
    assert json.loads((tmp_path / "two.jsonl").read_text())["messages"] == [{"role": "system", "content": "be brief"}]
    term.expect("you> ")  # Ctrl-D only means "quit" once the prompt is reading
    term.send("\x04")  # Ctrl-D at the prompt quits
    assert term.close() == 0


def test_ctrl_c_stops_the_answer_and_the_session_goes_on(terminal, make_chat_run, tmp_path):
    # An LSTM has no context limit, so its answer can run long enough to be interrupted.
    run = make_chat_run(kind="lstm")
    term = terminal(str(run), "--seed", "1", "--max-new-tokens", "8000", "--min-new-tokens", "8000")
    term.expect("you> ")
    term.send("a wonderful film\n")
    term.expect("a wonderful film\n")
    time.sleep(1.0)  # let it stream for a while
    term.send("\x03")
    term.expect("[stopped]")
    term.expect("you> ")
    term.send(f"/save {tmp_path / 'c.jsonl'}\n")
    term.expect("(saved 2 messages")
    reply = json.loads((tmp_path / "c.jsonl").read_text())["messages"][1]["content"]
    assert 0 < len(reply)
    term.expect("you> ")
    term.send("\x03")  # at the prompt Ctrl-C only clears the line
    term.expect("you> ")
    term.send("\x04")
    assert term.close() == 0


def test_message_prints_one_answer(make_chat_run, capsys):
    run = make_chat_run()
    args = [str(run), "--message", "a wonderful film", "--seed", "2", "--max-new-tokens", "6"]
    assert main(["chat", *args]) == 0
    first = capsys.readouterr().out
    assert main(["chat", *args]) == 0
    assert capsys.readouterr().out == first and first.endswith("\n")


def test_chat_without_template_says_how_and_chat_template_adds_one(make_run, tmp_path, capsys):
    run = make_run()
    assert main(["chat", str(run), "--message", "hi"]) == 2
    assert "--chat-template FILE" in capsys.readouterr().err
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert main(["chat", str(run), "--message", "hi", "--max-new-tokens", "3", "--chat-template", str(template)]) == 0
    assert (run / "chat_template.jinja").read_text() == template.read_text()


def test_a_conversation_too_long_for_the_context_is_refused(make_chat_run, capsys):
    run = make_chat_run()
    assert main(["chat", str(run), "--message", "a wonderful film " * 40]) == 2
    assert "tokens too many" in capsys.readouterr().err
