import pytest
import torch

from aigc.config import SampleConfig, model_preset
from aigc.errors import AigcError
from aigc.generate import Request, decode_stream, encode_request, generate
from aigc.models import build_model
from aigc.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, sample_tokens
from aigc.textstream import TextStream

GREEDY = SampleConfig(temperature=0, max_new_tokens=24)
POS_TEXT = "I loved this film, great acting."
NEG_TEXT = "这部电影太无聊了，剧情很差。"


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(tokenizer, kind="gpt", seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(model_preset("tiny", kind=kind, vocab_size=tokenizer.vocab_size, **overrides)).eval()


def drain(stream):
    """All events of a decode_stream, then its completions."""
    events = list(stream)
    return events, stream.completions


@pytest.fixture(scope="module")
def trained(tiny_tokenizer):
    """A tiny GPT that learned two labelled documents by heart (a plain loop, ~60 steps)."""
    tok = tiny_tokenizer
    docs = [tok.eot_id, tok.label_id("pos"), *tok.encode(POS_TEXT), tok.eot_id, tok.label_id("neg")]
    docs += tok.encode(NEG_TEXT)
    stream = torch.tensor(docs * 40)
    model = tiny_model(tok, seed=1)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        starts = torch.randint(0, len(stream) - 33, (8,))
        batch = torch.stack([stream[s : s + 33] for s in starts.tolist()])
        _, loss = model(batch[:, :-1], targets=batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


# -- pure sampling functions --------------------------------------------------------------------


def test_apply_top_k_keeps_k_largest_per_row():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [1.0, 4.0, 3.0, 2.0]])
    out = apply_top_k(logits, torch.tensor([2, 0]))
    assert torch.isinf(out[0]).tolist() == [True, False, False, True]
    assert torch.equal(out[1], logits[1])  # k = 0 keeps everything


def test_apply_top_p_keeps_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_top_p(probs.log(), torch.tensor([[0.7]]))
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]
    out = apply_top_p(probs.log(), torch.tensor([[0.1]]))
    assert torch.isfinite(out[0]).tolist() == [True, False, False, False]  # the best token always stays


def test_apply_repetition_penalty_lowers_seen_tokens_only():
    logits = torch.tensor([[2.0, -2.0, 2.0]])
    seen = torch.tensor([[True, True, False]])
    out = apply_repetition_penalty(logits, seen, torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -4.0, 2.0]]


def test_sample_tokens_greedy_rows_take_argmax_and_sampled_rows_follow_the_cdf():
    logits = torch.tensor([[0.0, 0.0, 5.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]).log_softmax(-1)
    temperature = torch.tensor([[0.0], [1.0], [1.0]])
    tokens = sample_tokens(logits, temperature, torch.tensor([0.0, 0.1, 0.9]))
    assert tokens.tolist() == [2, 0, 2]  # uniform probabilities: 0.1 falls in the first third, 0.9 in the last


def test_text_stream_waits_for_whole_utf8_characters():
    stream = TextStream(())
    data = "好".encode()
    assert stream.push(data[:1], final=False) == ""
    assert stream.push(data[1:], final=False) == "好"


def test_text_stream_holds_back_a_possible_stop_string_and_cuts_it():
    stream = TextStream(("END",))
    assert stream.push(b"abc E", final=False) == "abc "
    assert stream.push(b"N", final=False) == ""
    assert stream.push(b"Dxyz", final=False) == ""
    assert stream.stopped and stream.text == "abc E"[:4]


# -- the decode loop ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_generate_batched_greedy_equals_one_by_one(tiny_tokenizer, kind):
    model = tiny_model(tiny_tokenizer, kind)
    prompts = [("a wonderful film", "pos"), ("", None), ("这部电影 and a much longer prompt than others", "neg")]
    requests = [Request(prompt, label, GREEDY) for prompt, label in prompts]
    batched = generate(model, tiny_tokenizer, requests)
    for request, completion in zip(requests, batched):
        alone = generate(model, tiny_tokenizer, [request])[0]
        assert completion.token_ids == alone.token_ids and completion.text == alone.text
    assert len({c.token_ids for c in batched}) >= 2  # the rows really differ


def test_generate_same_seed_same_text_whatever_the_batch(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    config = SampleConfig(temperature=1.0, top_k=40, top_p=0.95, seed=7, max_new_tokens=20)
    request = Request("a film", config=config)
    alone = generate(model, tiny_tokenizer, [request])[0]
    other = Request("something else entirely", config=SampleConfig(temperature=1.0, seed=1))
    in_batch = generate(model, tiny_tokenizer, [other, request])[1]
    assert in_batch.token_ids == alone.token_ids
    reseeded = generate(model, tiny_tokenizer, [Request("a film", config=SampleConfig(temperature=1.0, seed=8))])[0]
    assert reseeded.token_ids != alone.token_ids


def test_identical_prompts_are_prefilled_once_with_the_same_samples(tiny_tokenizer, monkeypatch):
    model = tiny_model(tiny_tokenizer)
    configs = [SampleConfig(temperature=1.0, seed=seed, max_new_tokens=12) for seed in range(4)]
    seeded = [Request("a film", config=config) for config in configs]
    requests = [*seeded, Request("another one", config=GREEDY), Request("a film", label="pos", config=GREEDY)]
    alone = [generate(model, tiny_tokenizer, [request])[0] for request in requests]
    prefill_rows = []
    forward = type(model).forward

    def counted(self, idx, *args, **kwargs):
        if idx.shape[1] > 1:
            prefill_rows.append(idx.shape[0])
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", counted)
    batched = generate(model, tiny_tokenizer, requests)
    assert prefill_rows == [3]  # "a film" once for its four samples, then the two other contexts
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert len({c.token_ids for c in batched[:4]}) > 1  # the four samples still differ


def test_generate_events_concatenate_to_the_completion(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    requests = [Request("Review", config=GREEDY), Request("好", config=SampleConfig(temperature=1.0, seed=3))]
    events, completions = drain(decode_stream(model, tiny_tokenizer, requests))
    for completion in completions:
        mine = [e for e in events if e.index == completion.index]
        assert "".join(e.text for e in mine) == completion.text
        assert tuple(e.token_id for e in mine) == completion.token_ids
        assert tiny_tokenizer.decode(completion.token_ids) == completion.text


def test_generate_stop_string_is_excluded_and_ends_the_row(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    full = generate(model, tiny_tokenizer, [Request("a film", config=GREEDY)])[0].text
    stop = full[8:11]
    assert stop and full.find(stop) >= 0
    config = SampleConfig(temperature=0, max_new_tokens=24, stop=(stop,))
    events, [cut] = drain(decode_stream(model, tiny_tokenizer, [Request("a film", config=config)]))
    assert cut.text == full[: full.find(stop)] and cut.finish_reason == "stop"
    assert "".join(e.text for e in events) == cut.text


def test_generate_stops_at_end_of_text_and_follows_the_label(trained, tiny_tokenizer):
    config = SampleConfig(temperature=0, max_new_tokens=60)
    completions = generate(trained, tiny_tokenizer, [Request("", "pos", config), Request("", "neg", config)])
    assert [c.text for c in completions] == [POS_TEXT, NEG_TEXT]  # Chinese decodes whole
    assert all(c.finish_reason == "stop" and c.token_ids[-1] == tiny_tokenizer.eot_id for c in completions)


def test_generate_min_new_tokens_suppresses_end_of_text(trained, tiny_tokenizer):
    config = SampleConfig(temperature=0, max_new_tokens=30, min_new_tokens=30)
    [completion] = generate(trained, tiny_tokenizer, [Request("", "pos", config)])
    assert len(completion.token_ids) == 30 and completion.finish_reason == "length"
    assert tiny_tokenizer.eot_id not in completion.token_ids
    assert completion.text.startswith(POS_TEXT)


def test_generate_logprobs_match_the_model(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    request = Request("a film", config=SampleConfig(temperature=0, max_new_tokens=3, logprobs=4))
    [completion] = generate(model, tiny_tokenizer, [request])
    first = completion.logprobs[0]
    with torch.no_grad():
        logits, _ = model(torch.tensor([encode_request(tiny_tokenizer, request)]))
    expected = logits[0, -1].log_softmax(-1)
    assert first.logprob == pytest.approx(expected[first.token_id].item(), abs=1e-4)
    assert len(first.top_logprobs) == 4
    values = [v for _, v in first.top_logprobs]
    assert values == sorted(values, reverse=True) and values[0] == first.logprob  # greedy took the top one
    assert generate(model, tiny_tokenizer, [Request("a film", config=GREEDY)])[0].logprobs is None


def test_generate_slides_the_window_past_the_context(tiny_tokenizer):
    """Greedy decoding past block_size equals a naive re-computation with the documented policy:
    when the context is full, keep the <|endoftext|> prefix and the last block_size // 2 tokens."""
    block = 16
    model = tiny_model(tiny_tokenizer, block_size=block)
    prompt = "Review 3: a wonderful film with a moving story and great acting, I loved every minute"
    request = Request(prompt, config=SampleConfig(temperature=0, max_new_tokens=40))
    [completion] = generate(model, tiny_tokenizer, [request])
    context = encode_request(tiny_tokenizer, request)
    context = context[:1] + context[1:][-(block - 1) :]  # a too-long prompt keeps its end
    assert completion.prompt_tokens == block
    expected = []
    with torch.no_grad():
        for _ in range(40):
            token = int(model(torch.tensor([context]))[0][0, -1].argmax())
            expected.append(token)
            if token == tiny_tokenizer.eot_id:
                break
            if len(context) == block:
                context = context[:1] + context[1:][-(block // 2 - 1) :]
            context.append(token)
    assert list(completion.token_ids) == expected


def test_generate_unknown_label_lists_the_known_ones(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    with pytest.raises(AigcError, match="unknown label 'meh'.*pos, neg"):
        generate(model, tiny_tokenizer, [Request("x", label="meh")])


def test_generate_restores_training_mode_and_handles_no_requests(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer).train()
    generate(model, tiny_tokenizer, [Request("x", config=SampleConfig(max_new_tokens=2))])
    assert model.training
    assert generate(model, tiny_tokenizer, []) == []
