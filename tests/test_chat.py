"""Chat templates: rendered as `transformers.apply_chat_template` renders them, bad messages refused,
generation stops at the end-of-turn token, and a conversation never silently cut to the context."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from aigc.chat import (
    ChatTemplate,
    Message,
    encode_chat,
    install_chat_template,
    load_chat_template,
    parse_messages,
)
from aigc.config import SampleConfig
from aigc.errors import AigcError
from aigc.generate import Request, generate
from aigc.models import load_run
from aigc.tokenizer import EOT, Tokenizer
from tests.conftest import TINY_CHAT_TEMPLATE

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "  Answer in French.\n"},
        {"role": "user", "content": 'Write a line about tea <b>&</b> "cake" — 好吃'},
        {"role": "assistant", "content": "Le thé et le gâteau."},
        {"role": "user", "content": "Another one"},
    ],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "  spaced  "}],
]
# Exercises the environment's features: trim/lstrip of blocks, tojson, loop controls, raise_exception.
FEATURE_TEMPLATE = """
{%- if messages[0]['role'] == 'assistant' %}{{ raise_exception('start with a user') }}{% endif %}
{% for m in messages %}
    {% if m['content'] == 'skip me' %}{% continue %}{% endif %}
    <{{ m['role'] }}>{{ m['content'] | tojson }}{% generation %}{{ eos_token }}{% endgeneration %}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}
"""

# ChatML with a default system prompt, as Qwen2-Instruct templates do: slicing, namespace, attribute access.
QWEN2_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set system = 'You are a helpful assistant.' %}"
    "{%- set rest = messages %}{%- endif %}{{- '<|im_start|>system\\n' ~ system ~ '<|im_end|>\\n' }}"
    "{%- set ns = namespace(turns=0) %}{%- for message in rest %}{%- set ns.turns = ns.turns + 1 %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}{{- ns.turns * '' }}"
)

# The operations the sandbox checks before they run (repetition, join, format, indent, tojson, ...), used
# the way real templates use them: the output must not change.
GUARDED_TEMPLATE = (
    "{%- set ns = namespace(n=0, text='') %}{{ messages | map(attribute='role') | join(', ') }}\n"
    "{%- for m in messages %}{% set ns.n = ns.n + 1 %}{% set ns.text = ns.text ~ m['content'][:3] %}"
    "{{ '%s:%d ' | format(m['role'], loop.index) }}{{ '{}|{}'.format(m['role'] | upper, m['content'] | length) }}"
    "{{ ('-' * 3) ~ m['content'] | replace(' ', '_') | center(20) }}{{ m | tojson(indent=2) | indent(2) }}\n"
    "{%- endfor %}{{ ns.n }} {{ ns.text }} {{ [1, 2] + [3] }} {{ 2 ** 10 }} {{ range(3) | list }}"
    "{{ messages | tojson }}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def transformers_tokenizer(tokenizer: Tokenizer, template: str) -> PreTrainedTokenizerFast:
    hf = PreTrainedTokenizerFast(tokenizer_object=tokenizer.hf, bos_token=EOT, eos_token=EOT)
    hf.chat_template = template
    return hf


@pytest.mark.parametrize("which", ["smollm2", "tiny", "features", "qwen2", "guarded"])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers_apply_chat_template(
    which, conversation, add_generation_prompt, request, tiny_tokenizer
):
    if which == "smollm2":
        source, tokenizer = request.getfixturevalue("smollm2_chat")
    else:
        sources = {"tiny": TINY_CHAT_TEMPLATE, "features": FEATURE_TEMPLATE, "qwen2": QWEN2_STYLE}
        sources["guarded"] = GUARDED_TEMPLATE
        source, tokenizer = sources[which], tiny_tokenizer
    theirs = transformers_tokenizer(tokenizer, source)
    expected = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    template = ChatTemplate(source)
    ours = template.render(parse_messages(conversation), add_generation_prompt=add_generation_prompt)
    assert ours == expected
    expected_ids = theirs.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)["input_ids"]
    assert tokenizer.encode(ours) == list(expected_ids)


def test_smollm2_turns_end_at_im_end(smollm2_chat):
    source, tokenizer = smollm2_chat
    prompt = encode_chat(ChatTemplate(source), tokenizer, [Message("user", "Hi")], context=2048, max_new_tokens=8)
    assert [tokenizer.hf.id_to_token(i) for i in prompt.stop_ids] == ["<|im_end|>", EOT]
    assert prompt.text.endswith("<|im_start|>assistant\n")
    assert prompt.ids[0] == tokenizer.hf.token_to_id("<|im_start|>")  # no <|endoftext|> put in front


def test_openai_text_parts_are_joined_and_other_parts_refused():
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert parse_messages([{"role": "user", "content": parts}]) == [Message("user", "one\ntwo")]
    image = {"type": "image_url", "image_url": {"url": "http://x/y.png"}}
    with pytest.raises(AigcError, match=r"messages\[0\]\.content\[1\] is not text \(type 'image_url'\)"):
        parse_messages([{"role": "user", "content": [parts[0], image]}])


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "must be a non-empty list"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role must be one of system, user, assistant, tool"),
        ([{"role": "tool", "content": "x"}], r"messages\[0\] is a tool result: it needs tool_call_id"),
        ([{"role": "user"}], r"messages\[0\]\.content must be a string or a list of text parts, got NoneType"),
        ([{"role": "user", "content": 3}], "got int"),
        (["hi"], r"messages\[0\] must be an object"),
    ],
)
def test_bad_messages_are_refused_with_the_reason(messages, message):
    with pytest.raises(AigcError, match=message):
        parse_messages(messages)


def test_a_template_that_fails_is_an_aigc_error(tiny_tokenizer):
    with pytest.raises(AigcError, match="does not parse"):
        ChatTemplate("{% for m in messages %}")
    failing = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(AigcError, match="failed to render these messages: roles must alternate"):
        failing.render([Message("user", "x")])
    with pytest.raises(AigcError, match="rendered these messages as empty text"):
        encode_chat(ChatTemplate(""), tiny_tokenizer, [Message("user", "x")], context=64)


def test_a_conversation_longer_than_the_context_says_by_how_much(tiny_tokenizer):
    template = ChatTemplate(TINY_CHAT_TEMPLATE)
    messages = [Message("user", "a wonderful film " * 10)]
    size = len(encode_chat(template, tiny_tokenizer, messages, context=None).ids)
    with pytest.raises(AigcError, match=f"is {size} tokens and 8 more are asked for.*context is {size}: 8 tokens too"):
        encode_chat(template, tiny_tokenizer, messages, context=size, max_new_tokens=8)
    assert len(encode_chat(template, tiny_tokenizer, messages, context=size + 8, max_new_tokens=8).ids) == size


def test_a_run_without_template_says_how_to_add_one(make_run, tmp_path):
    run_dir = make_run()
    with pytest.raises(AigcError, match="has no chat template.*aigc import.*--chat-template FILE"):
        load_chat_template(run_dir)
    bad = tmp_path / "bad.jinja"
    bad.write_text("{{ messages[5]['content'] }}")
    with pytest.raises(AigcError, match="failed to render"):
        install_chat_template(run_dir, bad)
    good = tmp_path / "good.jinja"
    good.write_text(TINY_CHAT_TEMPLATE)
    install_chat_template(run_dir, good)
    assert load_chat_template(run_dir).source == TINY_CHAT_TEMPLATE


def test_generation_stops_at_the_end_of_turn_token(make_chat_run):
    run = load_run(make_chat_run())
    prompt = encode_chat(load_chat_template(run.path), run.tokenizer, [Message("user", "hi")], context=None)
    config = SampleConfig(seed=3, max_new_tokens=12)
    free = generate(run.model, run.tokenizer, [Request(prompt_ids=prompt.ids, config=config)])[0]
    stop_at = free.token_ids[2]  # pretend the third token generated is the end of the turn
    request = Request(prompt_ids=prompt.ids, stop_ids=(stop_at,), config=config)
    stopped = generate(run.model, run.tokenizer, [request])[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: free.token_ids.index(stop_at) + 1]
    assert stopped.prompt_tokens == len(prompt.ids)


# A template that reads tools the way tool-aware templates (Qwen2's) do: the `tools` list, each assistant
# turn's `tool_calls` (function name, arguments as an object) and `tool` turns.
TOOLS_TEMPLATE = (
    "{% if tools %}[tools]{% for t in tools %} {{ t.function.name }}={{ t.function.parameters | tojson }}"
    "{% endfor %}\n{% endif %}{% for m in messages %}{{ m.role }}: {{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<call>{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</call>{% endfor %}{% if m.role == 'tool' %} ({{ m.tool_call_id }}){% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_tools_and_tool_calls_render_as_transformers_passes_them(tiny_tokenizer):
    tools = [{"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object"}}}]
    call = {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "AB1"}'}}
    openai_messages = [
        {"role": "user", "content": "Where is AB1?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "shipped"},
    ]
    # transformers expects the arguments as an object (its chat-template docs); OpenAI sends JSON text.
    hf_call = {**call, "function": {"name": "lookup_order", "arguments": {"order_id": "AB1"}}}
    hf_messages = [
        openai_messages[0],
        {**openai_messages[1], "content": "", "tool_calls": [hf_call]},
        openai_messages[2],
    ]
    theirs = transformers_tokenizer(tiny_tokenizer, TOOLS_TEMPLATE)
    expected = theirs.apply_chat_template(hf_messages, tools=tools, tokenize=False, add_generation_prompt=True)
    ours = ChatTemplate(TOOLS_TEMPLATE).render(parse_messages(openai_messages), tools=tools)
    assert ours == expected and '<call>{"name": "lookup_order", "arguments": {"order_id": "AB1"}}</call>' in ours
