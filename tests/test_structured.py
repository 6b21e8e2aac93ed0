"""Structured output: schema-constrained rows in the one decode loop, and schemas that fail closed."""

import dataclasses
import json

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aigc.config import SampleConfig, model_preset
from aigc.errors import AigcError
from aigc.generate import Request, decode_stream, generate
from aigc.models import build_model
from aigc.structured import json_grammar

pytestmark = pytest.mark.usefixtures("one_thread")

REVIEW = {
    "type": "object",
    "properties": {"sentiment": {"enum": ["pos", "neg"]}, "reason": {"type": "string", "maxLength": 12}},
    "required": ["sentiment", "reason"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    return build_model(model_preset("tiny", vocab_size=tiny_tokenizer.vocab_size)).eval()


def sample(max_new_tokens=120, **options):
    return SampleConfig(max_new_tokens=max_new_tokens, temperature=options.pop("temperature", 1.0), **options)


# -- what schemas compile ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "uniqueItems"),
        ({"not": {"type": "string"}}, "not"),
        ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if"),
        ({"type": "string", "pattern": "(unclosed"}, "unclosed"),
        ({"type": "strng"}, "strng"),
    ],
)
def test_schema_the_engine_cannot_enforce_fails_closed_naming_the_construct(schema, named):
    with pytest.raises(AigcError, match=named):
        json_grammar(schema, "bad")


def test_schema_that_is_no_object_is_refused():
    with pytest.raises(AigcError, match="must be a JSON object"):
        json_grammar(["type", "object"])  # type: ignore[arg-type]


# -- constrained rows in the decode loop ---------------------------------------------------------


def test_constrained_and_free_rows_share_a_batch(model, tiny_tokenizer):
    grammar = json_grammar(REVIEW, "review")
    requests = [
        Request(prompt="a", config=sample(seed=1), grammar=grammar),
        Request(prompt="a", config=sample(seed=1, max_new_tokens=30)),
        Request(prompt="b", config=sample(seed=2), grammar=json_grammar(None)),
    ]
    constrained, free, any_object = generate(model, tiny_tokenizer, requests)
    jsonschema.validate(json.loads(constrained.text), REVIEW)
    assert constrained.finish_reason == "stop" and constrained.complete is True
    assert any_object.text.startswith("{") and any_object.complete is (any_object.finish_reason == "stop")
    if any_object.complete:
        assert isinstance(json.loads(any_object.text), dict)
    assert free.complete is None
    # The free row samples as it would alone: the mask of its neighbours does not touch it.
    (alone,) = generate(model, tiny_tokenizer, [requests[1]])
    assert alone.text == free.text


def test_constrained_row_streams_and_keeps_its_seed_and_logprobs(model, tiny_tokenizer):
    grammar = json_grammar(REVIEW, "review")
    request = Request(prompt="x", config=sample(seed=7, logprobs=2), grammar=grammar)
    stream = decode_stream(model, tiny_tokenizer, [request, request])
    texts = ["", ""]
    for event in stream:
        texts[event.index] += event.text
    first, second = stream.completions
    assert texts[0] == first.text and first.text == second.text  # same seed, same text, streamed whole
    assert len(first.logprobs) == len(first.token_ids)
    assert all(event.logprob <= 0 for event in first.logprobs)


def test_length_limit_inside_the_object_says_it_is_incomplete(model, tiny_tokenizer):
    request = Request(prompt="x", config=sample(max_new_tokens=3, seed=3), grammar=json_grammar(REVIEW))
    (completion,) = generate(model, tiny_tokenizer, [request])
    assert completion.finish_reason == "length" and completion.complete is False
    with pytest.raises(json.JSONDecodeError):
        json.loads(completion.text)


def test_stop_string_inside_the_object_says_it_is_incomplete(model, tiny_tokenizer):
    request = Request(prompt="x", config=sample(seed=3, stop=('"',)), grammar=json_grammar(REVIEW))
    (completion,) = generate(model, tiny_tokenizer, [request])
    assert completion.finish_reason == "stop" and completion.complete is False
    assert completion.text == "{"


def test_chat_end_of_turn_token_is_allowed_once_the_object_is_complete(model, tiny_tokenizer):
    # A number may go on (more digits) after it is complete: the row may end there by its end-of-turn.
    grammar = json_grammar({"type": "integer", "minimum": 0, "maximum": 10**6})
    end = tiny_tokenizer.label_id("pos")  # stands in for <|im_end|>
    requests = [Request(prompt="x", config=sample(seed=s), grammar=grammar, stop_ids=(end,)) for s in range(8)]
    for completion in generate(model, tiny_tokenizer, requests):
        assert completion.complete is True and 0 <= int(completion.text) <= 10**6


# -- conformance over generated schemas ----------------------------------------------------------

_leaf = st.one_of(
    st.lists(st.sampled_from(["a", "b c", "d"]), min_size=1, max_size=3, unique=True).map(lambda e: {"enum": e}),
    st.just({"type": "boolean"}),
    st.integers(-50, 50).map(lambda lo: {"type": "integer", "minimum": lo, "maximum": lo + 100}),
    st.integers(1, 8).map(lambda n: {"type": "string", "maxLength": n}),
    st.just({"type": "null"}),
)


def _object(children):
    props = st.dictionaries(st.sampled_from(["name", "tags", "n", "ok", "x"]), children, min_size=1, max_size=3)
    return props.map(
        lambda p: {"type": "object", "properties": p, "required": sorted(p), "additionalProperties": False}
    )


_schemas = st.recursive(
    _leaf,
    lambda children: st.one_of(
        _object(children),
        children.map(lambda item: {"type": "array", "items": item, "minItems": 1, "maxItems": 2}),
        st.lists(children, min_size=2, max_size=2).map(lambda options: {"anyOf": options}),
    ),
    max_leaves=5,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schema=_schemas, seed=st.integers(0, 2**16))
def test_every_complete_output_validates_against_its_schema(model, tiny_tokenizer, schema, seed):
    request = Request(prompt="x", config=sample(max_new_tokens=200, seed=seed), grammar=json_grammar(schema))
    (completion,) = generate(model, tiny_tokenizer, [request])
    assert completion.complete is (completion.finish_reason == "stop")
    if completion.complete:
        jsonschema.validate(json.loads(completion.text), schema)


def test_a_qwen2_shaped_tokenizer_is_constrained_too(tiny_tokenizer):
    """Qwen2's tokenizer.json differs from aigc's own in its NFC normaliser and a Split-then-ByteLevel
    pre-tokenizer; the grammar engine reads the vocabulary from the same JSON, so it must cope."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    from aigc.tokenizer import Tokenizer

    hf = type(tiny_tokenizer.hf).from_str(tiny_tokenizer.hf.to_str())
    hf.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(Regex(r"\p{N}| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+"), behavior="isolated")
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    hf.add_special_tokens(["<|im_end|>"])
    tokenizer = Tokenizer(hf, labels=tiny_tokenizer.labels)
    torch.manual_seed(1)
    model = build_model(model_preset("tiny", vocab_size=tokenizer.vocab_size)).eval()
    end = hf.token_to_id("<|im_end|>")
    requests = [
        Request(prompt="x", config=sample(seed=s), grammar=json_grammar(REVIEW), stop_ids=(end,)) for s in range(4)
    ]
    for completion in generate(model, tokenizer, requests):
        jsonschema.validate(json.loads(completion.text), REVIEW)


def test_lstm_rows_and_guided_rows_are_constrained_too(tiny_tokenizer):
    torch.manual_seed(2)
    lstm = build_model(model_preset("tiny", kind="lstm", vocab_size=tiny_tokenizer.vocab_size)).eval()
    grammar = json_grammar(REVIEW)
    (completion,) = generate(lstm, tiny_tokenizer, [Request(prompt="x", config=sample(seed=5), grammar=grammar)])
    jsonschema.validate(json.loads(completion.text), REVIEW)
    torch.manual_seed(0)
    gpt = build_model(model_preset("tiny", vocab_size=tiny_tokenizer.vocab_size)).eval()
    guided = Request(prompt="x", label="pos", config=sample(seed=5, guidance_scale=3.0), negative_label="neg")
    (completion,) = generate(gpt, tiny_tokenizer, [dataclasses.replace(guided, grammar=grammar)])
    jsonschema.validate(json.loads(completion.text), REVIEW)
