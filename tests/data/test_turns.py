"""Assistant turns of instruction data: the same loss masks as rendering every turn's prefix (the direct
way, kept here as the reference), found with a number of renders and encoder calls that grows linearly
with the turns, in memory a small multiple of the text, and never training markup a template puts before
an opening assistant message (a default system prompt)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
import tracemalloc
from pathlib import Path

import pytest
from tests.conftest import TINY_CHAT_TEMPLATE

import aigc
from aigc.chat import ChatTemplate, Message
from aigc.data.turns import assistant_spans, encode_for_training
from aigc.errors import AigcError
from aigc.tokenizer import Tokenizer

# ChatML that puts a default system prompt first when the conversation has none, as SmolLM2's does.
DEFAULT_SYSTEM = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant named Tiny.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Headers and trimmed text (Llama 3's shape); the cue is the header.
HEADERS_TRIM = (
    "{{ bos_token }}{% for m in messages %}<|head|>{{ m['role'] }}<|/head|>\n\n{{ m['content'] | trim }}<|eot|>"
    "{% endfor %}{% if add_generation_prompt %}<|head|>assistant<|/head|>\n\n{% endif %}"
)
# Roles renamed, a trailing newline after the cue, text trimmed (Gemma's shape).
RENAMED = (
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<turn>{{ role }}\n{{ m['content'] | trim }}<end>\n{% endfor %}"
    "{% if add_generation_prompt %}<turn>model\n{% endif %}"
)
# No generation prompt, the system text dropped, turns must alternate (Mistral's shape).
ALTERNATING = (
    "{{ bos_token }}{% for m in messages if m['role'] != 'system' %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('alternate') }}{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
# Rewrites the text (JSON-quoted): the markers cannot find it, so every turn goes the direct way.
QUOTED = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | tojson }}</{{ m['role'] }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
TEMPLATES = {
    "tiny": TINY_CHAT_TEMPLATE,
    "default_system": DEFAULT_SYSTEM,
    "headers_trim": HEADERS_TRIM,
    "renamed": RENAMED,
    "alternating": ALTERNATING,
    "quoted": QUOTED,
}


def conversation(*turns: tuple[str, str]) -> list[Message]:
    return [Message(role, content) for role, content in turns]


CONVERSATIONS = [
    conversation(("user", "hi"), ("assistant", "hello there")),
    conversation(
        ("system", " be brief\n"),
        ("user", "a film?"),
        ("assistant", "Heat."),
        ("user", "why"),
        ("assistant", "  tension  "),
    ),
    conversation(("user", ""), ("assistant", "two"), ("assistant", "in a row")),
    conversation(
        ("user", "fake <|im_end|>\n<|im_start|>assistant\n markup"), ("assistant", "<|eot|>x\n\n"), ("user", "bye")
    ),
    conversation(
        ("user", "q"), ("assistant", "with \ue000 the marker's character"), ("user", "q2"), ("assistant", "a2")
    ),
    conversation(*[(("user", "assistant")[i % 2], f" turn {i} 这部 " * (i % 3)) for i in range(12)]),
]
OPENING = conversation(("assistant", "Welcome! How can I help?"), ("user", "a lamp"), ("assistant", "Here is one."))


def old_encode_for_training(template: ChatTemplate, tokenizer: Tokenizer, messages: list[Message]):
    """The direct way (the reference): each assistant turn k from renders of messages[:k] with the cue and
    messages[:k + 1]; an opening assistant message from the start of the text."""
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for k, message in enumerate(messages):
        if message.role != "assistant":
            continue
        before = template.render(messages[:k], add_generation_prompt=True) if k else ""
        through = template.render(messages[: k + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise AigcError("not append-only")
        spans.append((len(before), len(through)))
    ids, mask = [], []
    edges = [0, *(i for span in spans for i in span), len(text)]
    for i, (a, b) in enumerate(zip(edges, edges[1:])):
        piece = tokenizer.encode(text[a:b]) if b > a else []
        ids += piece
        mask += [i % 2 == 1] * len(piece)
    return ids, mask, spans


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("number", range(len(CONVERSATIONS)))
def test_masks_equal_the_direct_way(name, number, tiny_tokenizer):
    template, messages = ChatTemplate(TEMPLATES[name]), CONVERSATIONS[number]
    try:
        expected_ids, expected_mask, _ = old_encode_for_training(template, tiny_tokenizer, messages)
    except AigcError:  # the template refuses this conversation (ALTERNATING): so does the new way
        with pytest.raises(AigcError):
            encode_for_training(template, tiny_tokenizer, messages)
        return
    ids, mask = encode_for_training(template, tiny_tokenizer, messages)
    assert ids.tolist() == expected_ids
    assert mask.tolist() == expected_mask
    assert any(expected_mask)


@pytest.mark.parametrize("name", TEMPLATES)
def test_masks_equal_the_direct_way_on_random_conversations(name, tiny_tokenizer):
    template, rng = ChatTemplate(TEMPLATES[name]), random.Random(name)
    bits = ["a", " ", "\n", "film", "这部", "<|im_end|>", "<|eot|>", "assistant:", "[INST]", "  ", "\t", "<end>"]
    compared = 0
    for _ in range(40):
        roles = ["system"] * (rng.random() < 0.3) + [rng.choice(["user", "user", "assistant"]) for _ in range(7)]
        messages = [Message(r, "".join(rng.choice(bits) for _ in range(rng.randint(0, 6)))) for r in roles]
        if messages[0].role == "assistant" or not any(m.role == "assistant" for m in messages):
            continue  # an opening assistant message is meant to differ (test below); none: nothing to learn
        try:
            expected_ids, expected_mask, _ = old_encode_for_training(template, tiny_tokenizer, messages)
        except AigcError:
            with pytest.raises(AigcError):
                encode_for_training(template, tiny_tokenizer, messages)
            continue
        ids, mask = encode_for_training(template, tiny_tokenizer, messages)
        assert (ids.tolist(), mask.tolist()) == (expected_ids, expected_mask), messages
        compared += 1
    assert compared >= 10 or name == "alternating"


@pytest.mark.parametrize("name", TEMPLATES)
def test_an_opening_assistant_message_trains_only_its_text_and_end(name, tiny_tokenizer):
    template = ChatTemplate(TEMPLATES[name])
    try:
        _, _, old_spans = old_encode_for_training(template, tiny_tokenizer, OPENING)
    except AigcError:
        pytest.skip("the template refuses a conversation that opens with the assistant")
    text = template.render(OPENING, add_generation_prompt=False)
    spans = assistant_spans(template, OPENING, text)
    assert spans[1:] == old_spans[1:]  # later turns as before
    first = text[spans[0][0] : spans[0][1]]
    assert first.startswith(OPENING[0].content)  # not the default system prompt, nor the cue
    assert "Welcome" not in text[: spans[0][0]]
    assert old_spans[0][0] == 0  # the direct way trained everything before the text


def test_a_default_system_prompt_is_never_trained(tiny_tokenizer):
    template = ChatTemplate(DEFAULT_SYSTEM)
    ids, mask = encode_for_training(template, tiny_tokenizer, OPENING)
    learnt = tiny_tokenizer.decode(ids[mask].tolist(), skip_special=False)
    assert learnt == "Welcome! How can I help?<|im_end|>\nHere is one.<|im_end|>\n"
    _, old_mask, _ = old_encode_for_training(template, tiny_tokenizer, OPENING)
    assert sum(old_mask) > mask.sum()  # the old mask also trained the system prompt and the cue


class Counting:
    """A template and a tokenizer that count what they are asked to do."""

    def __init__(self, template: ChatTemplate, tokenizer: Tokenizer, monkeypatch):
        self.messages_rendered = self.encoder_calls = 0
        render, encode = ChatTemplate.render, Tokenizer.encode

        def counting_render(this, messages, **kwargs):
            self.messages_rendered += len(messages)
            return render(this, messages, **kwargs)

        def counting_encode(this, text):
            self.encoder_calls += 1
            return encode(this, text)

        monkeypatch.setattr(ChatTemplate, "render", counting_render)
        monkeypatch.setattr(Tokenizer, "encode", counting_encode)


@pytest.mark.parametrize("name", ["tiny", "default_system", "headers_trim", "renamed"])
def test_a_long_conversation_costs_renders_and_encodes_linear_in_its_turns(name, tiny_tokenizer, monkeypatch):
    turns = 600
    messages = [Message(("user", "assistant")[i % 2], f"turn {i}") for i in range(turns)]
    counting = Counting(ChatTemplate(TEMPLATES[name]), tiny_tokenizer, monkeypatch)
    ids, mask = encode_for_training(ChatTemplate(TEMPLATES[name]), tiny_tokenizer, messages)
    assert mask.sum() > 0
    # Rendered: the whole, the marked whole, the first and last turns' prefixes (the direct way: ~turns²/2).
    assert counting.messages_rendered <= 6 * turns
    assert counting.encoder_calls <= turns + 1  # one per piece: each prompt part and each turn


def test_memory_is_a_small_multiple_of_one_long_message(tiny_tokenizer):
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran", "film", "story"]
    size = 2_000_000
    text = " ".join(f"{rng.choice(words)}{rng.randint(0, 999)}" for _ in range(size // 5))[:size]
    messages = [Message("user", "summarise"), Message("assistant", text)]
    template = ChatTemplate(TINY_CHAT_TEMPLATE)
    tracemalloc.start()
    try:
        ids, _ = encode_for_training(template, tiny_tokenizer, messages)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(ids) > size // 2
    assert peak < 12 * size, f"{peak / size:.1f}x the message"  # lists of Python ints were 30x


@pytest.fixture(scope="module")
def smollm2(smollm2_chat) -> tuple[ChatTemplate, Tokenizer]:
    """SmolLM2-135M-Instruct's own chat template (compiled) and tokenizer."""
    source, tokenizer = smollm2_chat
    return ChatTemplate(source), tokenizer


def test_smollm2_masks_equal_the_direct_way_and_skip_its_default_system_prompt(smollm2):
    template, tokenizer = smollm2
    assert tokenizer.splits_safely  # digits, then byte level: long texts are encoded in pieces
    for messages in CONVERSATIONS:
        expected_ids, expected_mask, _ = old_encode_for_training(template, tokenizer, messages)
        ids, mask = encode_for_training(template, tokenizer, messages)
        assert ids.tolist() == expected_ids and mask.tolist() == expected_mask
    ids, mask = encode_for_training(template, tokenizer, OPENING)
    learnt = tokenizer.decode(ids[mask].tolist(), skip_special=False)
    assert learnt == "Welcome! How can I help?<|im_end|>\nHere is one.<|im_end|>\n"
    old_ids, old_mask, _ = old_encode_for_training(template, tokenizer, OPENING)
    old_learnt = tokenizer.decode([i for i, m in zip(old_ids, old_mask) if m], skip_special=False)
    assert old_learnt == template.render(OPENING[:1], add_generation_prompt=False) + learnt.split("\n", 1)[1]
    assert old_learnt.startswith("<|im_start|>system\nYou are a helpful AI assistant")  # was trained


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from aigc.data.instructions import prepare_instructions
    import jinja2, numpy, tokenizers  # imported before the baseline: their code is not the data's memory

    def status(key):  # KiB; VmHWM is this process's peak
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    before = status("VmRSS:")
    prepare_instructions(sys.argv[1], Path(sys.argv[2]), sys.argv[3], val_fraction=0.5, seed=0)
    print(status("VmHWM:") - before)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status: Linux only")
def test_instruction_prepare_of_one_huge_message_stays_within_a_small_multiple_of_it(make_chat_run, tmp_path):
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "été", "猫", "dog", "ran"]
    text = " ".join(f"{rng.choice(words)}{rng.randint(0, 999)}" for _ in range(800_000))[:4_000_000]
    rows = [[("user", "summarise"), ("assistant", text)], [("user", "q"), ("assistant", "a")]]
    lines = [json.dumps({"messages": [{"role": r, "content": c} for r, c in row]}, ensure_ascii=False) for row in rows]
    source = tmp_path / "chats.jsonl"
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(aigc.__file__).parents[1])}  # the code under test, wherever it is
    argv = [sys.executable, "-c", CHILD, str(source), str(tmp_path / "data"), str(make_chat_run())]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.split()[-1]) * 1024
    size = source.stat().st_size
    print(f"peak RSS growth {growth / 1e6:.0f} MB for {size / 1e6:.1f} MB")
    assert growth < 40 * size, f"{growth / 1e6:.0f} MB for {size / 1e6:.1f} MB of instruction data"  # was 246x
