"""Text that is not valid UTF-8 is refused where it comes in, with one line naming where it was.

A byte that is not UTF-8 on the command line or on a terminal reaches Python as a surrogate
(`$'caf\\xe9'` is "caf\\udce9"); JSON may escape a lone surrogate (`"\\ud800"`). The tokenizer cannot
take either: before, each gave a traceback (`TypeError: TextInputSequence must be str`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aigc.cli import main

SRC = Path(__file__).resolve().parents[2] / "src"
BAD_ARG = "caf\udce9"  # what Python makes of the argv bytes b"caf\xe9"
MESSAGE = "must be valid UTF-8 text; character 3 is \\udce9 (the byte 0xE9, not UTF-8)"

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*args: str | bytes, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8:strict"}
    argv = [sys.executable.encode(), b"-m", b"aigc", *(a if isinstance(a, bytes) else a.encode() for a in args)]
    return subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=120)


@pytest.mark.parametrize(
    "command, option",
    [
        (["chat", "{run}", "--message"], "--message"),
        (["chat", "{run}", "--message", "hi", "--system"], "--system"),
        (["generate", "{run}", "--prompt"], "--prompt"),
        (["generate", "{run}", "--guidance-scale", "2", "--negative-prompt"], "--negative-prompt"),
        (["generate", "{run}", "--stop"], "--stop"),
        (["batch", "{run}", "--input", "in.csv", "--out", "out.csv", "--template"], "--template"),
    ],
)
def test_a_command_line_argument_that_is_not_utf8_is_one_line_exit_2(
    make_chat_run, command, option, capsys, monkeypatch, tmp_path
):
    monkeypatch.chdir(tmp_path)
    run = str(make_chat_run())
    assert main([part.format(run=run) for part in command] + [BAD_ARG]) == 2
    err = capsys.readouterr().err
    assert err == f"aigc: error: {option} {MESSAGE}\n"


def test_argv_bytes_reach_the_check_as_python_decodes_them(make_chat_run):
    result = run_cli("chat", str(make_chat_run()), "--message", b"caf\xe9")
    assert result.returncode == 2
    assert result.stderr.decode() == f"aigc: error: --message {MESSAGE}\n"


def test_interactive_chat_refuses_a_line_that_is_not_utf8_and_goes_on(make_chat_run):
    # Strict stdin decoding (a UTF-8 locale) raised UnicodeDecodeError; a surrogateescape locale, a TypeError.
    result = run_cli("chat", str(make_chat_run()), "--max-new-tokens", "2", stdin=b"caf\xe9\nhello\n")
    err = result.stderr.decode()
    assert result.returncode == 0, err
    assert f"aigc chat: error: the line read from standard input {MESSAGE}" in err
    assert "Traceback" not in err
    assert result.stdout.decode().count("you> ") == 3  # the bad line, the answered one, end of input


def test_files_that_are_not_utf8_name_the_line(make_chat_run, tmp_path, capsys):
    run = str(make_chat_run())
    (tmp_path / "prompt.txt").write_bytes(b"fine\ncaf\xe9\n")
    assert main(["generate", run, "--prompt-file", str(tmp_path / "prompt.txt")]) == 2
    assert "prompt.txt line 2 is not valid UTF-8 (byte 0xE9" in capsys.readouterr().err
    (tmp_path / "in.csv").write_bytes(b"title\nfine\ncaf\xe9\n")
    argv = [
        "batch",
        run,
        "--input",
        str(tmp_path / "in.csv"),
        "--out",
        str(tmp_path / "o.csv"),
        "--template",
        "{title}",
    ]
    assert main(argv) == 2
    assert "in.csv line 3 is not valid UTF-8 (byte 0xE9" in capsys.readouterr().err


def test_jsonl_escapes_of_lone_surrogates_name_the_line_and_field(make_chat_run, tmp_path, capsys):
    run = str(make_chat_run())
    rows = [{"title": "fine"}, {"title": "x\ud800"}]  # json.dumps writes the escape "\ud800"
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    argv = [
        "batch",
        run,
        "--input",
        str(tmp_path / "in.jsonl"),
        "--out",
        str(tmp_path / "o.csv"),
        "--template",
        "{title}",
    ]
    assert main(argv) == 2
    expected = "in.jsonl line 2: title must be valid UTF-8 text; character 1 is \\ud800 (a lone surrogate)"
    assert expected in capsys.readouterr().err


@pytest.mark.parametrize(
    "raw, expected",
    [
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\udfff"}]}\n',
            "chat.jsonl line 2: messages[1].content must be valid UTF-8 text; character 1 is \\udfff",
        ),
        (
            b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "caf\xe9"}]}\n',
            "chat.jsonl line 2 is not valid UTF-8 (byte 0xE9",
        ),
    ],
)
def test_instruction_data_that_is_not_utf8_names_the_line(make_chat_run, tmp_path, capsys, raw, expected):
    good = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    (tmp_path / "chat.jsonl").write_bytes(good + raw)
    argv = ["prepare", str(tmp_path / "chat.jsonl"), "--out", str(tmp_path / "d"), "--chat-template-from"]
    assert main([*argv, str(make_chat_run())]) == 2
    assert expected in capsys.readouterr().err
