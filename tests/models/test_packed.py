import copy

import pytest
import torch

from aigc.config import model_preset
from aigc.models import build_model, packed
from aigc.models.packed import Linear

needs_onednn = pytest.mark.skipif(not packed.onednn_linear_available(), reason="this PyTorch has no oneDNN linear")


def tiny_gpt(preset="tiny"):
    torch.manual_seed(0)
    return build_model(model_preset(preset, vocab_size=50)).eval()


def packed_layers(model):
    return [m for m in model.modules() if isinstance(m, Linear) and m.packed_copy.packed is not None]


@needs_onednn
@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_inference_runs_every_linear_from_a_packed_copy_with_the_same_logits(preset):
    model = tiny_gpt(preset)
    idx = torch.randint(0, 50, (3, 7))
    with torch.enable_grad():
        reference, _ = model(idx)  # autograd on: the plain path, nothing packed
    assert packed_layers(model) == []
    with torch.no_grad():
        logits, _ = model(idx)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * model.config.n_layer + 1 and packed_layers(model) == linears
    torch.testing.assert_close(logits, reference.detach(), atol=1e-5, rtol=1e-4)


@needs_onednn
def test_packed_copy_follows_in_place_edits_replaced_data_and_mode_switches():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 5))

    def plain_and_packed():
        with torch.enable_grad():
            plain = model(idx)[0].detach()
        with torch.no_grad():
            return plain, model(idx)[0]

    with torch.no_grad():
        before = model(idx)[0]
        model.h[0].mlp.c_fc.weight.mul_(3.0)  # an in-place edit bumps the version
    plain, fast = plain_and_packed()
    assert not torch.allclose(before, fast)
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-4)

    model.h[0].attn.c_attn.weight.data = torch.randn_like(model.h[0].attn.c_attn.weight)  # new storage
    torch.testing.assert_close(*reversed(plain_and_packed()), atol=1e-5, rtol=1e-4)

    # A fused AdamW step changes weights without bumping their versions; train() drops the copies.
    model.train()
    assert packed_layers(model) == []
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    model(idx, targets=idx)[1].backward()
    optimizer.step()
    model.eval()
    torch.testing.assert_close(*reversed(plain_and_packed()), atol=1e-5, rtol=1e-4)
    # eval() on a model already in eval mode (generate calls one per batch) keeps the copies.
    kept = [m.packed_copy.packed for m in packed_layers(model)]
    assert len(kept) == 4 * model.config.n_layer + 1
    model.eval()
    assert all(m.packed_copy.packed is copy for m, copy in zip(packed_layers(model), kept))
    assert len(packed_layers(model)) == len(kept)


def test_a_packed_model_can_be_deep_copied_and_copies_compute_the_same():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        reference = model(idx)[0]
        twin = copy.deepcopy(model)
        assert packed_layers(twin) == []
        torch.testing.assert_close(twin(idx)[0], reference)


def test_without_onednn_every_layer_takes_the_plain_path(monkeypatch):
    model = tiny_gpt("llama-tiny")
    idx = torch.randint(0, 50, (2, 4))
    with torch.enable_grad():
        reference = model(idx)[0].detach()
    monkeypatch.setattr(packed, "onednn_linear_available", lambda: False)
    with torch.no_grad():
        cache = model.new_cache(2)
        torch.testing.assert_close(model(idx, cache=cache)[0], reference)
    assert packed_layers(model) == []


def test_training_mode_and_autocast_never_pack():
    model = tiny_gpt().train()
    idx = torch.randint(0, 50, (2, 4))
    with torch.no_grad():
        model(idx)
    assert packed_layers(model) == []
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx)
    assert packed_layers(model) == []
