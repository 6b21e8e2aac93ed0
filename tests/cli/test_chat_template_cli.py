"""`aigc chat --chat-template FILE` and `/save`: the template is checked before it is stored and replaces
RUN/chat_template.jinja atomically (a symlink there is replaced, never written through); a /save that
cannot write is one line and the conversation goes on."""

from __future__ import annotations

import json

from aigc.cli import main


def test_chat_template_replaces_a_symlink_and_leaves_its_target_alone(make_chat_run, tmp_path):
    run = make_chat_run()
    elsewhere = tmp_path / "precious.txt"
    elsewhere.write_text("not yours to overwrite")
    (run / "chat_template.jinja").unlink()
    (run / "chat_template.jinja").symlink_to(elsewhere)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    assert main(["chat", str(run), "--message", "hi", "--max-new-tokens", "2", "--chat-template", str(template)]) == 0
    assert elsewhere.read_text() == "not yours to overwrite"
    assert not (run / "chat_template.jinja").is_symlink()
    assert (run / "chat_template.jinja").read_text() == template.read_text()


def test_chat_template_that_fails_the_check_is_refused_and_not_stored(make_chat_run, tmp_path, capsys):
    run = make_chat_run()
    before = (run / "chat_template.jinja").read_text()
    hostile = tmp_path / "h.jinja"
    hostile.write_text("{{ 'x' * 10**9 }}")
    assert main(["chat", str(run), "--message", "hi", "--chat-template", str(hostile)]) == 2
    err = capsys.readouterr().err
    assert f"chat template {hostile}" in err and "the limit is" in err and len(err.strip().splitlines()) == 1
    assert (run / "chat_template.jinja").read_text() == before


def test_save_to_a_folder_is_one_line_and_the_conversation_is_kept(terminal, make_chat_run, tmp_path):
    run = make_chat_run()
    term = terminal(str(run), "--seed", "1", "--max-new-tokens", "4")
    term.expect("you> ")
    term.send("a wonderful film\n")
    term.expect("you> ")
    term.send(f"/save {tmp_path}\n")
    shown = term.expect("you> ")
    assert f"aigc chat: error: {tmp_path} is a folder" in shown and "Traceback" not in shown
    term.send(f"/save {tmp_path / 'kept.jsonl'}\n")
    term.expect("(saved 2 messages")
    saved = json.loads((tmp_path / "kept.jsonl").read_text())["messages"]
    assert [m["role"] for m in saved] == ["user", "assistant"] and saved[0]["content"] == "a wonderful film"
    term.expect("you> ")
    term.send("\x04")
    assert term.close() == 0
