"""Classifier-free guidance in the shared decode loop (aigc.guidance)."""

import dataclasses

import pytest
import torch

from aigc.config import SampleConfig, model_preset
from aigc.errors import AigcError
from aigc.generate import Request, encode_request, generate
from aigc.guidance import guided_scores
from aigc.models import build_model

GREEDY = SampleConfig(temperature=0, max_new_tokens=20)
GUIDED = dataclasses.replace(GREEDY, guidance_scale=3.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(tokenizer, kind="gpt", **overrides):
    torch.manual_seed(0)
    return build_model(model_preset("tiny", kind=kind, vocab_size=tokenizer.vocab_size, **overrides)).eval()


def test_guided_scores_are_conditional_plus_scaled_difference():
    cond, negative = torch.randn(3, 11), torch.randn(3, 11)
    scale = torch.tensor([[1.0], [2.0], [4.5]])
    out = guided_scores(cond, negative, scale)
    lc, ln = cond.log_softmax(-1), negative.log_softmax(-1)
    torch.testing.assert_close(out[0], lc[0])  # scale 1: plain log-probabilities
    torch.testing.assert_close(out[2], lc[2] + 3.5 * (lc[2] - ln[2]))
    torch.testing.assert_close(guided_scores(cond, cond, scale), lc)  # nothing to steer away from


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_a_negative_equal_to_the_context_changes_nothing_in_a_mixed_batch(tiny_tokenizer, kind):
    """guided = log p + (s - 1)(log p - log p) = log p: every row, guided or not, decodes as alone and
    unguided, through padding, rows that finish early (max_new_tokens) and rows dropped mid-batch."""
    model = tiny_model(tiny_tokenizer, kind)
    prompts = ["a wonderful film", "", "这部电影 and a much longer prompt than the others"]
    plain = [Request(p, config=dataclasses.replace(GREEDY, max_new_tokens=8 + 6 * i)) for i, p in enumerate(prompts)]
    guided = [
        Request(r.prompt, config=dataclasses.replace(r.config, guidance_scale=3.0), negative_prompt=r.prompt)
        for r in plain
    ]
    mixed = [guided[0], plain[1], guided[2]]
    expected = [c.token_ids for c in generate(model, tiny_tokenizer, plain)]
    assert [c.token_ids for c in generate(model, tiny_tokenizer, mixed)] == expected
    assert [c.token_ids for c in generate(model, tiny_tokenizer, guided)] == expected


def test_guided_greedy_token_and_logprob_follow_the_formula(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    request = Request(
        "a wonderful film",
        label="pos",
        config=dataclasses.replace(GUIDED, max_new_tokens=1, logprobs=1),
        negative_prompt="a dull film",
        negative_label="neg",
    )
    negative = Request("a dull film", label="neg")
    with torch.no_grad():
        cond = model(torch.tensor([encode_request(tiny_tokenizer, request)]))[0][:, -1]
        neg = model(torch.tensor([encode_request(tiny_tokenizer, negative)]))[0][:, -1]
    scores = guided_scores(cond, neg, torch.tensor([[3.0]]))[0]
    [completion] = generate(model, tiny_tokenizer, [request])
    assert completion.token_ids[0] == int(scores.argmax())
    assert completion.logprobs[0].logprob == pytest.approx(float(scores.log_softmax(-1).max()), abs=1e-4)
    unguided = cond.log_softmax(-1)[0, completion.token_ids[0]]
    assert abs(completion.logprobs[0].logprob - float(unguided)) > 1e-3  # the negative really took part


def test_guidance_survives_the_sliding_window(tiny_tokenizer):
    """Past block_size both the row and its negative re-prefill their windows; an identical negative
    still changes nothing."""
    model = tiny_model(tiny_tokenizer, block_size=16)
    long = "Review 3: a wonderful film with a moving story and great acting, I loved every minute"
    config = SampleConfig(temperature=0, max_new_tokens=40)
    [plain] = generate(model, tiny_tokenizer, [Request(long, config=config)])
    guided = Request(long, config=dataclasses.replace(config, guidance_scale=2.0), negative_prompt=long)
    assert generate(model, tiny_tokenizer, [guided])[0].token_ids == plain.token_ids


def test_guidance_mistakes_are_one_clear_error(tiny_tokenizer):
    model = tiny_model(tiny_tokenizer)
    with pytest.raises(AigcError, match="only acts with guidance"):
        generate(model, tiny_tokenizer, [Request("x", config=GREEDY, negative_prompt="y")])
    with pytest.raises(AigcError, match="unknown label 'meh'"):
        generate(model, tiny_tokenizer, [Request("x", config=GUIDED, negative_label="meh")])
    with pytest.raises(AigcError, match="not available for chat"):
        generate(model, tiny_tokenizer, [Request(prompt_ids=(1, 2), config=GUIDED)])
    for bad in (0.5, float("nan"), float("inf"), 21.0):
        with pytest.raises(AigcError, match="--guidance-scale must be in"):
            SampleConfig(guidance_scale=bad)
