"""A fine-tuned chat model still chats: fine-tuning (LoRA or full) a run that has a chat template gives
a run with the template it was trained for (instruction data's over the base's), and its config says
where it came from; merge, int8 export and --resume keep it."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from aigc.artifacts.run import CHAT_TEMPLATE, read_run_config
from aigc.cli import main
from aigc.config import ServeConfig
from aigc.models import load_run
from aigc.serve import create_app

TRAIN = "--max-steps 4 --eval-every 4 --eval-batches 1 --seq-len 32 --batch-size 4 --device cpu --dtype fp32 --quiet"
# A template unlike the base's, to tell which one a run got.
OTHER_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}<assistant>"
CHAT = {"model": "tuned", "messages": [{"role": "user", "content": "a wonderful film"}], "max_tokens": 3}


def chats(run_dir, capsys) -> None:
    """`aigc chat RUN --message` answers, and the chat API over the run accepts a conversation."""
    assert main(["chat", str(run_dir), "--message", "a wonderful film", "--max-new-tokens", "3", "--seed", "1"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    app = create_app(load_run(run_dir), ServeConfig(allowed_hosts=("testserver",), model_name="tuned"))
    with TestClient(app) as client:
        response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["role"] == "assistant"


def test_lora_finetune_on_plain_text_keeps_the_base_template(make_chat_run, tiny_data, tmp_path, capsys):
    base, tuned = make_chat_run(name="base"), tmp_path / "tuned"
    argv = ["train", "--init-from", str(base), "--data", str(tiny_data), "--out", str(tuned), "--lora-rank", "4"]
    assert main([*argv, *TRAIN.split()]) == 0
    config = read_run_config(tuned)
    assert config.weights.format == "lora"
    assert (tuned / CHAT_TEMPLATE).read_text() == (base / CHAT_TEMPLATE).read_text()
    assert config.chat_template_source == {"from": "base", "path": str(base)}
    chats(tuned, capsys)

    assert main(["train", "--resume", str(tuned), "--max-steps", "6", "--quiet"]) == 0
    assert read_run_config(tuned).chat_template_source == {"from": "base", "path": str(base)}
    assert main(["merge", str(tuned), "--out", str(tmp_path / "merged")]) == 0
    assert main(["export", str(tuned), "--format", "int8", "--out", str(tmp_path / "int8")]) == 0
    for out in ("merged", "int8"):
        assert (tmp_path / out / CHAT_TEMPLATE).read_text() == (base / CHAT_TEMPLATE).read_text()
        assert read_run_config(tmp_path / out).chat_template_source == config.chat_template_source
        chats(tmp_path / out, capsys)


@pytest.fixture
def instruction_data(make_chat_run, tmp_path):
    """Conversations prepared with the template of a run other than the base (same tokenizer)."""
    other = make_chat_run(name="other")
    (other / CHAT_TEMPLATE).write_text(OTHER_TEMPLATE, encoding="utf-8")
    rows = [
        {"messages": [{"role": "user", "content": f"describe item {i}"}, {"role": "assistant", "content": "fine"}]}
        for i in range(12)
    ]
    source = tmp_path / "train.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    data = tmp_path / "data"
    assert main(["prepare", str(source), "--out", str(data), "--chat-template-from", str(other)]) == 0
    return data


def test_full_finetune_on_instruction_data_takes_the_data_template(make_chat_run, instruction_data, tmp_path, capsys):
    base, tuned = make_chat_run(name="base"), tmp_path / "tuned"
    argv = ["train", "--init-from", str(base), "--data", str(instruction_data), "--out", str(tuned)]
    assert main([*argv, "--lora-rank", "0", *TRAIN.split()]) == 0
    assert read_run_config(tuned).weights.format == "full"
    assert (instruction_data / CHAT_TEMPLATE).read_text() == OTHER_TEMPLATE  # the data keeps what laid it out
    assert (tuned / CHAT_TEMPLATE).read_text() == OTHER_TEMPLATE  # not the base's: the data's format was learned
    source = read_run_config(tuned).chat_template_source
    assert source == {"from": "instruction data", "path": str(instruction_data.resolve())}
    chats(tuned, capsys)


def test_training_from_scratch_on_plain_text_has_no_template(tiny_data, tmp_path):
    assert (
        main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), "--preset", "tiny", *TRAIN.split()])
        == 0
    )
    assert not (tmp_path / "run" / CHAT_TEMPLATE).exists()
    assert read_run_config(tmp_path / "run").chat_template_source is None
