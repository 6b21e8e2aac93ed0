"""LoRA over a block-quantised base (QLoRA): a frozen `QuantLinear` passes the gradient of its input
without keeping its weight expanded, and a whole quantised GPT with adapters and grown label rows
computes the loss and gradients of its float32 twin (the same weights, expanded)."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from aigc.cli import main
from aigc.models import load_run, quant
from aigc.models.lora import LoRASpec, QuantLoRALinear, apply_lora, has_lora, hold_frozen_in, merge_lora
from aigc.models.qblocks import TYPES, dequantize
from aigc.models.qlayers import QuantEmbedding, QuantLinear, expand_quantised, quantised_weights
from aigc.models.qlinear import Part
from aigc.models.vocab import GrownQuantEmbedding, GrownQuantHead, grow_frozen


def quant_layer(type_name: str, rows: int, cols: int, *, bias: bool = True) -> tuple[QuantLinear, torch.Tensor]:
    """A QuantLinear of two parts (`type_name` blocks, then float32 rows) and its float32 weight."""
    generator = torch.Generator().manual_seed(0)
    blocks = quant.random_blocks(type_name, rows, cols, generator)
    plain = torch.randn(3, cols, generator=generator) * 0.05
    layer = QuantLinear(
        [Part(type_name, blocks, rows, cols), Part("F32", plain, 3, cols)],
        torch.randn(rows + 3, generator=generator) if bias else None,
    )
    return layer, torch.cat((dequantize(blocks, type_name, cols), plain))  # (rows + 3, cols)


@pytest.mark.parametrize("type_name", ["Q8_0", "Q4_0", "Q5_1", "Q4_K", "Q6_K"])
def test_the_input_gradient_is_that_of_the_dequantised_weight(type_name):
    cols = 2 * TYPES[type_name].block
    layer, weight = quant_layer(type_name, 37, cols)
    x = torch.randn(5, 7, cols, requires_grad=True)  # (B, T, in)
    grad_y = torch.randn(5, 7, weight.shape[0])
    y = layer(x)
    torch.testing.assert_close(y, x @ weight.T + layer.bias, rtol=1e-4, atol=1e-4)
    y.backward(grad_y)
    torch.testing.assert_close(x.grad, grad_y @ weight, rtol=1e-4, atol=1e-4)


def test_under_bf16_autocast_the_product_and_gradient_run_in_bf16():
    layer, weight = quant_layer("Q4_0", 64, 96)
    x = torch.randn(9, 96, requires_grad=True)
    grad_y = torch.randn(9, 67)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.backward(grad_y.to(torch.bfloat16))
    assert x.grad.dtype == torch.float32  # the gradient comes back in the input's dtype
    torch.testing.assert_close(y.float(), x @ weight.T + layer.bias, rtol=3e-2, atol=6e-2)
    torch.testing.assert_close(x.grad, grad_y @ weight, rtol=3e-2, atol=6e-2)


def test_the_backward_pass_keeps_no_expanded_weight():
    """What autograd saves for the backward pass is recorded: nothing of the layer's (out, in) size,
    so a step never holds every layer expanded at once (a plain F.linear on the expansion would)."""
    layer, weight = quant_layer("Q4_0", 256, 64)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x).sum().backward()
    assert max(saved, default=0) < weight.numel(), saved
    torch.testing.assert_close(x.grad, weight.sum(0).expand(4, -1), rtol=1e-4, atol=1e-4)


def test_the_kernels_can_be_built_and_checked_inside_a_bf16_training_step():
    """The first expansion may happen under autocast; the build's check against the PyTorch
    dequantiser must still compare float32 with float32."""
    if shutil.which(os.environ.get("CC") or "cc") is None:
        pytest.skip("no C compiler")
    quant._kernels_for.cache_clear()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert quant.kernels() is not None, quant.unavailable_reason()
    finally:
        quant._kernels_for.cache_clear()


@pytest.fixture
def quantised_gpt(make_run, tmp_path):
    """(quantised GPT, its float32 twin): a tiny Llama-style run exported as Q4_0 (tables in Q8_0)."""

    def _make(gpt2: bool = False, **overrides):
        llama = {} if gpt2 else {"norm": "rmsnorm", "positions": "rotary", "mlp": "swiglu", "bias": False}
        source = make_run(name="fp32", **llama, **overrides)
        assert main(["export", str(source), "--format", "q4", "--out", str(tmp_path / "q4")]) == 0
        model = load_run(tmp_path / "q4").model
        assert isinstance(model.wte, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)
        return model, expand_quantised(copy.deepcopy(model))

    return _make


def adapted(model, seed: int):
    """LoRA r4 on every block layer (B random, so every gradient is non-zero) and two new label rows."""
    torch.manual_seed(seed)
    apply_lora(model, LoRASpec(rank=4, alpha=8.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.05)
    vocab = model.config.vocab_size
    grow_frozen(model, torch.randn(2, model.config.n_embd) * 0.02)
    return model.train(), vocab


@pytest.mark.parametrize("style", [{}, {"tie_embeddings": False}, {"gpt2": True}])  # GPT-2: biases, learned positions
@pytest.mark.parametrize("fused", [True, False])
def test_a_quantised_gpt_trains_as_its_float_twin(quantised_gpt, style, fused):
    quantised, twin = quantised_gpt(**style)
    (quantised, vocab), (twin, _) = adapted(quantised, 1), adapted(twin, 1)
    assert isinstance(quantised.h[0].attn.c_attn, QuantLoRALinear)
    assert isinstance(quantised.wte, GrownQuantEmbedding) and isinstance(quantised.lm_head, GrownQuantHead)
    idx = torch.tensor([[vocab, 3, 4, 5, vocab + 1, 6, 7, 8], [9, 10, vocab + 1, 12, 13, 14, vocab, 16]])
    losses = []
    for model in (quantised, twin):
        model.set_fused_training(fused)
        _, loss = model(idx, torch.roll(idx, -1, 1), return_logits=not fused)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    grads = {n: p.grad for n, p in quantised.named_parameters() if p.requires_grad}
    twin_grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
    assert grads.keys() == twin_grads.keys() and {"wte.new_rows", "h.1.mlp.c_fc.lora_A"} <= grads.keys()
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        torch.testing.assert_close(grad, twin_grads[name], rtol=1e-4, atol=1e-5, msg=name)


def test_merging_expands_the_base_and_folds_the_update_in(quantised_gpt, float_products):
    quantised, _ = quantised_gpt()
    quantised, vocab = adapted(quantised, 2)
    idx = torch.tensor([[vocab, 3, 4, 5, vocab + 1, 6]])
    quantised.eval()
    with torch.no_grad():
        before = quantised(idx)[0]
        merged = merge_lora(quantised)
        after = merged(idx)[0]
    assert not has_lora(merged) and quantised_weights(merged) == 0
    assert merged.lm_head.weight is merged.wte.weight  # still tied
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_held_in_bf16_the_quantised_table_keeps_the_residual_stream_in_bf16(quantised_gpt):
    """As a float table held in bf16 does (`hold_frozen_in`): an fp32 stream would double the
    activations of a bf16 step."""
    quantised, _ = quantised_gpt()
    quantised, vocab = adapted(quantised, 3)
    hold_frozen_in(quantised, torch.bfloat16)
    idx = torch.tensor([[vocab, 3, 4, 5, vocab + 1, 6]])
    assert quantised.wte(idx).dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = quantised(idx, torch.roll(idx, -1, 1), return_logits=False)
    loss.backward()
    assert torch.isfinite(loss) and quantised.wte.new_rows.grad.abs().sum() > 0
