"""Instruction fine-tuning: OpenAI fine-tuning JSONL rendered with a run's chat template, a loss mask on
the assistant's tokens stored with the shards, and training batches whose other targets are -1."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aigc.artifacts.dataset import open_dataset
from aigc.cli import main
from aigc.models import load_run
from aigc.tokenizer import EOT
from aigc.train.batches import BatchSampler, _gather, fixed_windows, learnable_starts
from aigc.train.loop import train
from conftest import tiny_train_config

PRODUCTS = ["mug", "lamp", "chair", "kettle", "scarf", "clock"]


def conversations(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        product = PRODUCTS[i % len(PRODUCTS)]
        messages = [{"role": "user", "content": f"describe the {product}"}]
        if i % 2:
            messages.insert(0, {"role": "system", "content": "be brief"})
        messages.append({"role": "assistant", "content": f"a wonderful {product} {i}"})
        rows.append({"messages": messages})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture
def instruction_data(make_chat_run, tmp_path):
    run = make_chat_run()
    source = write_jsonl(tmp_path / "train.jsonl", conversations(40))
    out = tmp_path / "data"
    assert main(["prepare", source, "--out", str(out), "--chat-template-from", str(run), "--val-fraction", "0.1"]) == 0
    return run, out


def test_prepare_masks_exactly_the_assistant_turns(instruction_data):
    _, out = instruction_data
    data = open_dataset(out)
    assert data.train.mask is not None and len(data.train.docs) == 36 and len(data.val.docs) == 4
    for split in (data.train, data.val):
        for start, end, _ in split.docs:
            ids, mask = np.asarray(split.tokens[start:end]), np.asarray(split.mask[start:end], dtype=bool)
            learnt = data.tokenizer.decode(ids[mask].tolist(), skip_special=False)
            whole = data.tokenizer.decode(ids.tolist(), skip_special=False)
            answer = whole.split("assistant:")[1].split(EOT)[0]
            assert answer.startswith(" a wonderful ")
            assert learnt == answer + EOT  # the turn and its end-of-turn token, nothing else


def test_batches_ignore_targets_outside_the_mask(instruction_data):
    _, out = instruction_data
    split = open_dataset(out).train
    starts = learnable_starts(split.mask, 16)
    inputs, targets = _gather(split.tokens, starts[:8], 16, torch.device("cpu"), split.mask)
    for row, s in enumerate(starts[:8]):
        keep = np.asarray(split.mask[s + 1 : s + 17], dtype=bool)
        assert keep.any()
        expected = np.where(keep, np.asarray(split.tokens[s + 1 : s + 17], dtype=np.int64), -1)
        assert targets[row].tolist() == expected.tolist()
    sampler = BatchSampler(split.tokens, 16, 4, seed=0, mask=split.mask)
    try:
        _, drawn = sampler.next(torch.device("cpu"))
    finally:
        sampler.close()
    assert ((drawn == -1).sum(dim=1) < 16).all() and (drawn == -1).any()


def test_training_on_instructions_learns_the_answers(instruction_data, tmp_path):
    run, out = instruction_data
    config = tiny_train_config(max_steps=30, eval_every=10, batch_size=8, learning_rate=1e-2)
    tuned = train(out, tmp_path / "tuned", train_config=config, init_from=run)
    metrics = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(m["train_loss"]) for m in metrics if "train_loss" in m)
    first = next(m["train_loss"] for m in metrics if "train_loss" in m)
    last = [m["train_loss"] for m in metrics if "train_loss" in m][-1]
    assert last < first


def test_bad_instruction_lines_name_the_line(make_chat_run, make_run, tmp_path, capsys):
    run = make_chat_run()
    bad = write_jsonl(tmp_path / "bad.jsonl", [conversations(1)[0], {"messages": [{"role": "bot", "content": "x"}]}])
    assert main(["prepare", bad, "--out", str(tmp_path / "d"), "--chat-template-from", str(run)]) == 2
    assert "bad.jsonl line 2: messages[0].role must be one of" in capsys.readouterr().err
    no_answer = write_jsonl(tmp_path / "q.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    assert main(["prepare", no_answer, "--out", str(tmp_path / "d"), "--chat-template-from", str(run)]) == 2
    assert "no assistant message" in capsys.readouterr().err
    plain = make_run(name="plain")
    good = write_jsonl(tmp_path / "g.jsonl", conversations(4))
    assert main(["prepare", good, "--out", str(tmp_path / "d"), "--chat-template-from", str(plain)]) == 2
    assert "has no chat template" in capsys.readouterr().err


def test_validation_counts_only_the_assistant_tokens(instruction_data, tmp_path):
    run, out = instruction_data
    config = tiny_train_config(max_steps=4, eval_every=4, batch_size=4, eval_batches=2)
    tuned = train(out, tmp_path / "tuned", train_config=config, init_from=run)
    logged = [json.loads(line) for line in (tuned / "metrics.jsonl").read_text().splitlines()][-1]
    model = load_run(tuned).model.eval()
    val = open_dataset(out).val
    block = model.config.block_size
    starts = fixed_windows(val.tokens, block, 2 * 4, val.mask)
    inputs, targets = _gather(val.tokens, starts, block, torch.device("cpu"), val.mask)
    assert all(np.asarray(val.mask[s + 1 : s + block + 1]).any() for s in starts)  # every window has an answer
    with torch.no_grad():
        logits = model(inputs)[0]
    answer_loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1).item()
    all_targets = _gather(val.tokens, starts, block, torch.device("cpu"))[1]
    every_token = F.cross_entropy(logits.flatten(0, 1), all_targets.flatten()).item()
    assert logged["val_loss"] == pytest.approx(answer_loss, rel=1e-4)
    assert abs(every_token - answer_loss) > 0.01 * answer_loss  # the prompts would have moved it
