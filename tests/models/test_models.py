import pytest
import torch

from aigc.config import model_preset
from aigc.models import build_model


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_model_contract_logits_and_loss(kind):
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", kind=kind, vocab_size=50))
    idx = torch.randint(0, 50, (2, 16))
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 50) and loss is None
    targets = torch.randint(0, 50, (2, 16))
    logits, loss = model(idx, targets=targets)
    # A fresh model predicts close to uniform: loss near ln(V).
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.5
    assert model.num_params() > model.num_params(non_embedding=True) > 0
    assert model.flops_per_token() > model.flops_per_token(training=False)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_model_incremental_decoding_matches_full_forward(kind):
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", kind=kind, vocab_size=50)).eval()
    idx = torch.randint(0, 50, (3, 20))
    full, _ = model(idx)
    cache = model.new_cache(3)
    chunks = [model(idx[:, :7], cache=cache)[0], model(idx[:, 7:12], cache=cache)[0]]
    chunks += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-4)


def test_gpt_left_padding_is_invisible():
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", vocab_size=50)).eval()
    prompt = torch.randint(1, 50, (1, 5))
    reference, _ = model(prompt)
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    pad_mask = torch.tensor([[False] * 3 + [True] * 5])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    out, _ = model(padded, cache=model.new_cache(1), positions=positions, pad_mask=pad_mask)
    torch.testing.assert_close(out[:, 3:], reference, atol=1e-5, rtol=1e-4)


def test_gpt_ties_input_and_output_embeddings():
    model = build_model(model_preset("tiny", vocab_size=50))
    assert model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()


def test_gpt_refuses_sequence_longer_than_context():
    model = build_model(model_preset("tiny", vocab_size=50, block_size=8))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 9, dtype=torch.long))
