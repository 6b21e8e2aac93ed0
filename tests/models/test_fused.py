"""The fused training functions against the eager PyTorch formulation: outputs and gradients, in fp32
(tight) and bf16 (looser), and a tiny Llama-style model that trains the same way with and without them."""

import pytest
import torch
import torch.nn.functional as F

from aigc.config import model_preset
from aigc.models import build_model, fused, native, native_train
from aigc.models.gpt import apply_rotary, rotary_tables
from aigc.models.lora import LoRASpec, apply_lora, hold_frozen_in
from aigc.models.vocab import grow_frozen

pytestmark = pytest.mark.usefixtures("one_thread")
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 4e-2}  # absolute, on values of order 1
DTYPES = list(TOLERANCE)


def grads(out: torch.Tensor, inputs, grad_out: torch.Tensor):
    return torch.autograd.grad(out, inputs, grad_out)


def assert_close(ours, reference, dtype, scale: float = 1.0):
    for a, b in zip(ours, reference):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), atol=TOLERANCE[dtype] * scale, rtol=TOLERANCE[dtype])


def leaf(*shape, dtype, scale: float = 1.0):
    return (torch.randn(*shape) * scale).to(dtype).requires_grad_()


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_attention_matches_sdpa_with_grouped_heads(dtype):
    torch.manual_seed(0)
    q, k, v = leaf(2, 6, 16, 8, dtype=dtype), leaf(2, 2, 16, 8, dtype=dtype), leaf(2, 2, 16, 8, dtype=dtype)
    grad_out = torch.randn(2, 6, 16, 8).to(dtype)
    out = fused.causal_attention(q, k, v)
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
    assert_close([out], [reference], dtype)
    assert_close(grads(out, (q, k, v), grad_out), grads(reference, (q, k, v), grad_out.float()), dtype)


def test_long_sequences_fall_back_to_sdpa(monkeypatch):
    monkeypatch.setattr(fused, "MATH_ATTENTION_MAX_T", 8)
    q = leaf(1, 2, 16, 4, dtype=torch.float32)
    out = fused.causal_attention(q, q, q)
    assert out.grad_fn.name() != "_CausalAttentionBackward"


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_cross_entropy_matches_logits_and_cross_entropy(dtype, monkeypatch):
    monkeypatch.setattr(fused, "CE_CHUNK_ROWS", 16)  # several chunks, the last one short
    torch.manual_seed(0)
    x, frozen, rows = leaf(40, 8, dtype=dtype), torch.randn(30, 8).to(dtype), leaf(3, 8, dtype=dtype)
    targets = torch.randint(0, 33, (40,))
    targets[::7] = -1  # ignored positions count neither in the mean nor in the gradients
    loss = fused.linear_cross_entropy(x, (frozen, rows), targets)
    logits = x.float() @ torch.cat((frozen, rows)).float().t()
    reference = F.cross_entropy(logits, targets, ignore_index=-1)
    assert_close([loss.to(dtype)], [reference], dtype)
    assert_close(grads(2 * loss, (x, rows), None), grads(2 * reference, (x, rows), None), dtype, scale=0.1)


def test_a_grown_head_keeps_its_concatenation_current():
    """The (V + n, C) table that the loss multiplies by is built once and follows both parts."""
    model = tiny_llama(lora=True)
    head, table = model.lm_head, model.lm_head.joined(torch.bfloat16)
    assert table.dtype == torch.bfloat16
    assert torch.equal(table, torch.cat(head.weight_parts(torch.bfloat16)).bfloat16())
    with torch.no_grad():
        head.new_rows.add_(1.0)  # an optimizer step on the new rows
        head.weight[0].add_(1.0)  # a change of the frozen part (a reload, say)
    again = head.joined(torch.bfloat16)
    assert torch.equal(again, torch.cat(head.weight_parts(torch.bfloat16)).bfloat16())
    idx = torch.randint(0, 42, (2, 9))
    losses = []
    for keep in (True, False):
        if not keep:
            head.joined = None  # the concatenation formed anew inside the loss
        loss = model(idx, idx, return_logits=False)[1]
        loss.backward()
        losses.append((loss.detach(), head.new_rows.grad.clone()))
        head.new_rows.grad = None
    torch.testing.assert_close(losses[0], losses[1], atol=0, rtol=0)


def test_linear_cross_entropy_gives_no_gradient_to_a_frozen_table():
    x, table = leaf(6, 4, dtype=torch.float32), torch.randn(9, 4)
    loss = fused.linear_cross_entropy(x, (table,), torch.randint(0, 9, (6,)))
    loss.backward()
    assert x.grad is not None and table.grad is None


@pytest.fixture(params=["native", "pytorch"])
def kernels(request, monkeypatch):
    """Both ways of the RMSNorm and SwiGLU functions: the native kernels (where they build) and PyTorch."""
    if request.param == "pytorch":
        monkeypatch.setattr(native_train, "kernels_for", lambda *tensors: None)
    elif native_train.kernels_for(torch.zeros(1)) is None:
        pytest.skip(f"no native kernels here: {native.unavailable_reason()}")
    return request.param


def test_native_training_kernels_serve_float32_and_bfloat16_only():
    if native.kernels() is None:
        pytest.skip(f"no native kernels here: {native.unavailable_reason()}")
    x = torch.zeros(4, 6)
    assert native_train.kernels_for(x) is not None and native_train.kernels_for(x.bfloat16()) is not None
    assert native_train.kernels_for(x.half()) is None and native_train.kernels_for(x.t()) is None
    assert native_train.kernels_for(x, x.bfloat16()) is None  # mixed dtypes


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_swiglu_and_rotary_match_eager(dtype, kernels):
    torch.manual_seed(0)
    x, weight = leaf(3, 5, 16, dtype=dtype), (1 + 0.1 * torch.randn(16)).to(dtype).requires_grad_()
    g = torch.randn(3, 5, 16).to(dtype)
    out, reference = fused.rms_norm(x, weight, 1e-5), F.rms_norm(x.float(), (16,), weight.float(), 1e-5)
    assert_close([out], [reference], dtype)
    assert_close(grads(out, (x, weight), g), grads(reference, (x, weight), g.float()), dtype, scale=4)

    h, g = leaf(3, 5, 16, dtype=dtype), torch.randn(3, 5, 8).to(dtype)
    gate, up = h.float().chunk(2, dim=-1)
    out, reference = fused.swiglu(h), F.silu(gate) * up
    assert_close([out], [reference], dtype)
    assert_close(grads(out, h, g), grads(reference, h, g.float()), dtype)

    x, g = leaf(2, 3, 7, 8, dtype=dtype), torch.randn(2, 3, 7, 8).to(dtype)
    cos, sin = rotary_tables(torch.arange(7)[None], 8, 1e4, dtype)
    out, reference = fused.rotary(x, cos, sin), apply_rotary(x.float(), cos.float(), sin.float())
    assert_close([out], [reference], dtype)
    assert_close(grads(out, x, g), grads(reference, x, g.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_lora_linear_matches_the_eager_adapter(dtype, bias):
    torch.manual_seed(0)
    x, g = leaf(3, 5, 12, dtype=dtype), torch.randn(3, 5, 10).to(dtype)
    weight, b = torch.randn(10, 12).to(dtype) / 4, torch.randn(10).to(dtype) if bias else None
    lora_A, lora_B = leaf(4, 12, dtype=torch.float32, scale=0.3), leaf(10, 4, dtype=torch.float32, scale=0.3)
    out = fused.lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    reference = F.linear(x.float(), weight.float(), None if b is None else b.float())
    reference = reference + 2.0 * F.linear(F.linear(x.float(), lora_A), lora_B)
    assert_close([out], [reference], dtype, scale=2)
    ours, theirs = grads(out, (x, lora_A, lora_B), g), grads(reference, (x, lora_A, lora_B), g.float())
    assert ours[1].dtype == ours[2].dtype == torch.float32  # the adapters' gradients in their own precision
    assert_close([ours[0]], [theirs[0]], dtype, scale=2)
    tolerance = TOLERANCE[dtype] * 4
    for a, b_ in zip(ours[1:], theirs[1:]):
        torch.testing.assert_close(a, b_, atol=tolerance, rtol=tolerance)


def test_lora_linear_refuses_a_trainable_base():
    weight = torch.randn(3, 2, requires_grad=True)
    with pytest.raises(ValueError, match="frozen"):
        fused.lora_linear(torch.randn(1, 2), weight, None, torch.randn(1, 2), torch.randn(3, 1), 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_qkv_rotary_gives_the_rotated_heads_and_their_gradient(dtype, kernels):
    torch.manual_seed(0)
    B, T, H, G, D = 2, 7, 6, 2, 8
    qkv, cos_sin = leaf(B, T, (H + 2 * G) * D, dtype=dtype), rotary_tables(torch.arange(T)[None], D, 1e4, dtype)
    out = fused.qkv_rotary(qkv, *cos_sin, (H, G))
    if kernels == "pytorch":
        assert out is None  # the caller keeps to `rotary` and views
        return
    heads = qkv.float().view(B, T, H + 2 * G, D).transpose(1, 2)  # (B, H + 2 G, T, D)
    rotated = apply_rotary(heads[:, : H + G], *(t.float() for t in cos_sin))
    reference = rotated[:, :H], rotated[:, H:], heads[:, H + G :]
    assert all(o.is_contiguous() for o in out) and [o.shape for o in out] == [r.shape for r in reference]
    assert_close(out, reference, dtype)
    g = [torch.randn(r.shape).to(dtype) for r in reference]
    assert_close(grads(out, qkv, g), grads(reference, qkv, [x.float() for x in g]), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("uses_sum", [True, False], ids=["sum-used", "sum-unused"])
def test_add_rms_norm_matches_the_add_then_the_norm(dtype, uses_sum, kernels):
    torch.manual_seed(0)
    x, delta, weight = leaf(3, 5, 16, dtype=dtype), leaf(3, 5, 16, dtype=dtype), (1 + 0.1 * torch.randn(16)).to(dtype)
    g_sum, g_out = torch.randn(3, 5, 16).to(dtype), torch.randn(3, 5, 16).to(dtype)
    total, out = fused.add_rms_norm(x, delta, weight, 1e-5)
    reference_total = x.float() + delta.float()
    reference = F.rms_norm(reference_total, (16,), weight.float(), 1e-5)
    assert_close([total, out], [reference_total, reference], dtype)
    outputs = ([total] if uses_sum else []) + [out]  # the last block's sum feeds nothing but the norm
    ours = torch.autograd.grad(outputs, (x, delta), ([g_sum] if uses_sum else []) + [g_out])
    outputs = ([reference_total] if uses_sum else []) + [reference]
    theirs = torch.autograd.grad(outputs, (x, delta), ([g_sum.float()] if uses_sum else []) + [g_out.float()])
    assert_close(ours, theirs, dtype, scale=4)


def tiny_llama(seed: int = 0, lora: bool = False):
    """42 tokens either way: 40 + 2 new rows under LoRA."""
    torch.manual_seed(seed)
    model = build_model(model_preset("llama-tiny", vocab_size=40 if lora else 42)).train()
    if lora:
        apply_lora(model, LoRASpec(rank=4, alpha=8.0, targets=("c_attn", "c_proj", "c_fc")))
        grow_frozen(model, torch.randn(2, 64) * 0.02)  # two new label rows, as a labelled fine-tune has
    return model


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_fused_step_gives_the_loss_and_gradients_of_the_plain_one(lora):
    torch.manual_seed(1)
    idx, targets = torch.randint(0, 42, (3, 24)), torch.randint(0, 42, (3, 24))
    targets[0, :5] = -1
    results = []
    for enabled in (True, False):
        model = tiny_llama(lora=lora)
        model.set_fused_training(enabled)
        logits, loss = model(idx, targets, return_logits=not enabled)
        assert (logits is None) == enabled
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (fused_loss, fused_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, atol=1e-6, rtol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(fused_grads[name], plain_grads[name], atol=1e-6, rtol=1e-4, msg=name)


# The largest mean distance from the fp32 curve that plain bf16 showed over seeds 2-7 (see below).
PLAIN_BF16_DRIFT = 0.031


def fifty_lora_steps(fused: bool, dtype: torch.dtype) -> torch.Tensor:
    """The loss curve of 50 LoRA steps of `tiny_llama` over a small set of batches, revisited (it learns)."""
    torch.manual_seed(2)
    batches = [torch.randint(0, 42, (4, 17)) for _ in range(5)]
    model = tiny_llama(lora=True)
    model.set_fused_training(fused)
    if dtype == torch.bfloat16:
        hold_frozen_in(model, torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=True)
    curve = []
    for step in range(50):
        x = batches[step % len(batches)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(x[:, :-1], x[:, 1:], return_logits=not fused)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
    return torch.tensor(curve)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fifty_lora_steps_follow_the_same_loss_curve_fused_or_not(dtype):
    """Same seed, same batches: the curves agree within rounding (bf16: the base held in bf16 both ways)."""
    fused_curve, plain_curve = fifty_lora_steps(True, dtype), fifty_lora_steps(False, dtype)
    assert plain_curve[-5:].mean() < plain_curve[:5].mean() - 0.2  # it learns: the match is not trivial
    gap = (fused_curve - plain_curve).abs()
    if dtype == torch.float32:
        assert gap.max() < 1e-4
    else:
        # bf16 rounds differently in the two formulations (the native kernels round once per output,
        # PyTorch's ops once per op), and 50 steps compound it: the plain bf16 curve itself strays from
        # the fp32 one by up to 0.24 on some seeds. So: close on average, and no further from fp32 than
        # plain bf16 is on this seed, or than plain bf16 strays on other seeds (on a host without native
        # bf16 the two swap places from seed to seed: over seeds 2-7 on a 2-core AVX2 EPYC, 2026-12-04,
        # the mean drift was 0.013-0.032 fused and 0.012-0.031 plain).
        reference = fifty_lora_steps(False, torch.float32)
        assert gap.mean() < 0.03, gap
        drift = (fused_curve - reference).abs().mean(), (plain_curve - reference).abs().mean()
        assert drift[0] < max(1.25 * drift[1], PLAIN_BF16_DRIFT) + 0.002, drift


def test_evaluation_and_no_grad_use_the_plain_path():
    model = tiny_llama()
    idx = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        logits, loss = model(idx, idx, return_logits=False)
    assert logits is not None and loss is not None  # without gradients the logits cost nothing extra


def test_a_lora_model_with_its_base_in_bf16_runs_outside_autocast():
    """Samples drawn during a bf16 LoRA run see bf16 base weights and fp32 adapters, without autocast."""
    model = tiny_llama(lora=True)
    hold_frozen_in(model, torch.bfloat16)
    assert model.h[0].attn.c_attn.lora_A.dtype == torch.float32  # what trains keeps its precision
    with torch.no_grad():
        logits, _ = model.eval()(torch.tensor([[1, 2, 41]]))  # 41: a new vocabulary row
    assert logits.dtype == torch.bfloat16 and logits.shape == (1, 3, 42) and torch.isfinite(logits).all()
