"""Instruction data with keys whose content the chat template would drop (`modalities`, `function_call`,
...) is refused with one line naming the key and the line, never trained on silently."""

from __future__ import annotations

import json

import pytest

from aigc.cli import main

ANSWERED = [{"role": "user", "content": "describe the mug"}, {"role": "assistant", "content": "a fine mug"}]
CASES = {
    "modalities": ({"modalities": ["text", "audio"], "messages": ANSWERED}, "'modalities' is not supported"),
    "tools": ({"tools": [{"type": "function"}], "messages": ANSWERED}, "'tools' is not supported"),
    "function_call": (
        {"messages": [ANSWERED[0], {"role": "assistant", "content": "", "function_call": {"name": "f"}}]},
        "messages[1] has 'function_call'",
    ),
    "tool_calls": (
        {"messages": [ANSWERED[0], {"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]},
        "messages[1] has 'tool_calls'",
    ),
    "weight": ({"messages": [ANSWERED[0], {**ANSWERED[1], "weight": 0}]}, "messages[1] has 'weight'"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_prepare_refuses_keys_the_template_would_drop(make_chat_run, tmp_path, capsys, case):
    record, message = CASES[case]
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": ANSWERED}) + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    code = main(["prepare", str(source), "--out", str(tmp_path / "d"), "--chat-template-from", str(make_chat_run())])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "chat.jsonl line 2" in err and message in err
    assert not (tmp_path / "d").exists()
