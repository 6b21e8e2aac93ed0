"""The training step's elementwise passes from `native.c`: RMSNorm, SwiGLU and rotary positions (with
the split of qkv into head-major q, k, v), forward and backward, in float32 and bfloat16, one pass over
memory each.

Why: in PyTorch each of these is several ops (RMSNorm's forward five and its backward seven, SwiGLU's
backward three and a concatenation), each a pass over a (B, T, width) tensor, and on a 2-core CPU a
LoRA step of SmolLM2-135M spends more time in such passes than in its matrix products. One C loop per
row does the same arithmetic with the row in L1: forward + backward at batch 4 x 128 (one thread,
2-core Xeon with AMX, 2026-12-03) SwiGLU 1.1 ms against 5.5 (fp32) and 1.6 against 4.3 (bf16),
RMSNorm 0.22 against 1.33 (fp32) and 0.26 against 1.34 (bf16) for `aigc.models.fused`'s PyTorch
functions, which remain the fallback. Rotary positions with the split of qkv: +6 % on the whole bf16
LoRA step of SmolLM2-135M (docs/benchmarks.md has each change's A/B).

The library is `native.kernels()` (built, cached and checked as that module says); these kernels are
checked against PyTorch once more before their first use here, and `kernels_for(x)` is None where they
cannot serve (no build, a wrong result, another device or dtype), so callers keep to PyTorch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from aigc.models import native

SUFFIX = {torch.float32: "", torch.bfloat16: "_bf16"}
SHAPES = ((3, 2 * 37), (3, 45), (3, 37), (3, 45))  # h, x, their gradients: odd widths for the tails


def kernels_for(*tensors: torch.Tensor) -> native.Kernels | None:
    """The checked kernels when every tensor is a contiguous float32 or bfloat16 CPU tensor of one dtype."""
    dtype = tensors[0].dtype
    for tensor in tensors:
        if tensor.dtype != dtype or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return None
    if dtype not in SUFFIX:
        return None
    return _checked()


def _call(kernels: native.Kernels, name: str, dtype: torch.dtype):
    return getattr(kernels, f"_{name}{SUFFIX[dtype]}")


def _threads(x: torch.Tensor) -> int:
    return torch.get_num_threads() if x.numel() >= native.THREADED_ELEMENTS else 1


def rms_norm_forward(kernels, x: torch.Tensor, weight: torch.Tensor, eps: float, delta: torch.Tensor | None = None):
    """(s, y, rstd): s = x + delta (x itself when delta is None), y = s / rms(s) * weight over the last dim,
    and the (rows,) float32 reciprocal rms for the backward."""
    rows, width = x.numel() // x.shape[-1], x.shape[-1]
    assert weight.shape == (width,) and (delta is None or delta.shape == x.shape), (weight.shape, x.shape)
    s = x if delta is None else torch.empty_like(x)
    y, rstd = torch.empty_like(x), x.new_empty(rows, dtype=torch.float32)
    pointers = (x.data_ptr(), _pointer(delta), weight.data_ptr(), s.data_ptr(), y.data_ptr(), rstd.data_ptr())
    _call(kernels, "rms_norm_forward", x.dtype)(*pointers, rows, width, eps, _threads(x))
    return s, y, rstd


def rms_norm_backward(kernels, x, weight, rstd, grad, grad_residual=None) -> torch.Tensor:
    """The input's gradient of `rms_norm_forward` (x: its s) for `grad` shaped like x, plus
    `grad_residual` when given (what reaches s by the residual path)."""
    rows, width = x.numel() // x.shape[-1], x.shape[-1]
    assert grad.shape == x.shape and rstd.numel() == rows
    assert grad_residual is None or grad_residual.shape == x.shape
    out = torch.empty_like(x)
    pointers = (x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), grad.data_ptr(), _pointer(grad_residual))
    _call(kernels, "rms_norm_backward", x.dtype)(*pointers, out.data_ptr(), rows, width, _threads(x))
    return out


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def swiglu_forward(kernels, h: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for h (..., 2 H) = [gate | up] -> (..., H)."""
    hidden = h.shape[-1] // 2
    assert h.shape[-1] == 2 * hidden
    out = h.new_empty(*h.shape[:-1], hidden)
    _call(kernels, "swiglu_forward", h.dtype)(
        h.data_ptr(), out.data_ptr(), h.numel() // h.shape[-1], hidden, _threads(h)
    )
    return out


def swiglu_backward(kernels, h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient (..., 2 H) of `swiglu_forward` at h for `grad` (..., H), silu recomputed."""
    hidden = h.shape[-1] // 2
    assert grad.shape == (*h.shape[:-1], hidden)
    out = torch.empty_like(h)
    run = _call(kernels, "swiglu_backward", h.dtype)
    run(h.data_ptr(), grad.data_ptr(), out.data_ptr(), h.numel() // h.shape[-1], hidden, _threads(h))
    return out


def qkv_rotary(kernels, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: tuple[int, int]):
    """qkv (B, T, (H + 2 G) D) -> rotated q (B, H, T, D), rotated k and v (B, G, T, D), all contiguous;
    cos, sin (T, D) float32 contiguous; heads = (H, G)."""
    (B, T, width), (H, G) = qkv.shape, heads
    D = width // (H + 2 * G)
    assert width == (H + 2 * G) * D and cos.shape == sin.shape == (T, D) and cos.dtype == torch.float32
    q, k, v = qkv.new_empty(B, H, T, D), qkv.new_empty(B, G, T, D), qkv.new_empty(B, G, T, D)
    run = _call(kernels, "qkv_rotary", qkv.dtype)
    run(
        qkv.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        B,
        T,
        H,
        G,
        D,
        _threads(qkv),
    )
    return q, k, v


def qkv_rotary_backward(kernels, grads, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The gradient (B, T, (H + 2 G) D) of qkv in `qkv_rotary` for the gradients of q, k, v (contiguous)."""
    grad_q, grad_k, grad_v = grads
    (B, H, T, D), G = grad_q.shape, grad_k.shape[1]
    assert grad_k.shape == grad_v.shape == (B, G, T, D)
    out = grad_q.new_empty(B, T, (H + 2 * G) * D)
    run = _call(kernels, "qkv_rotary_backward", grad_q.dtype)
    pointers = (grad_q.data_ptr(), grad_k.data_ptr(), grad_v.data_ptr(), cos.data_ptr(), sin.data_ptr())
    run(*pointers, out.data_ptr(), B, T, H, G, D, _threads(out))
    return out


@functools.lru_cache(maxsize=1)
def _checked() -> native.Kernels | None:
    """The library when all four kernels match PyTorch in both dtypes on odd widths (the vector loops'
    tails), else None (and one warning on `native`'s logger)."""
    kernels = native.kernels()
    if kernels is None:
        return None
    generator = torch.Generator().manual_seed(0)
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        # Drawn in float32 and rounded to `dtype`, so that the reference sees the same inputs.
        h, x, g_h, g_x = (torch.randn(*s, generator=generator).to(dtype).float() for s in SHAPES)
        weight = x[0] + 2
        _, y, rstd = rms_norm_forward(kernels, x.to(dtype), weight.to(dtype), 1e-5)
        ours = [y, rms_norm_backward(kernels, x.to(dtype), weight.to(dtype), rstd, g_x.to(dtype))]
        ours += [swiglu_forward(kernels, h.to(dtype)), swiglu_backward(kernels, h.to(dtype), g_h.to(dtype))]
        with torch.enable_grad():  # the first use may come inside an autograd Function's forward
            x.requires_grad_(), h.requires_grad_()
            ref_y, ref_s = F.rms_norm(x, (45,), weight, 1e-5), F.silu(h[:, :37]) * h[:, 37:]
            theirs = [ref_y, torch.autograd.grad(ref_y, x, g_x)[0], ref_s, torch.autograd.grad(ref_s, h, g_h)[0]]
        for a, b in _rotary_pairs(kernels, dtype, generator):
            ours.append(a), theirs.append(b)
        for a, b in zip(ours, theirs):
            if not torch.allclose(a.float(), b.detach(), rtol=tolerance, atol=tolerance):
                native.log.warning("aigc: native training kernels compute wrong results here; using PyTorch's")
                return None
    return kernels


def _rotary_pairs(kernels, dtype: torch.dtype, generator: torch.Generator):
    """(ours, PyTorch's) for q, k, v and qkv's gradient of `qkv_rotary`: 2 rows of 5 tokens, 4 query
    heads, 2 key/value heads of width 6."""
    qkv = torch.randn(2, 5, 8 * 6, generator=generator).to(dtype).float()
    grads = [torch.randn(2, h, 5, 6, generator=generator).to(dtype).float() for h in (4, 2, 2)]
    angles = torch.randn(5, 3, generator=generator).repeat(1, 2)  # (T, D): both halves turn alike
    cos, sin = angles.cos(), angles.sin()
    ours = list(qkv_rotary(kernels, qkv.to(dtype), cos, sin, (4, 2)))
    ours.append(qkv_rotary_backward(kernels, [g.to(dtype) for g in grads], cos, sin))
    with torch.enable_grad():
        qkv.requires_grad_()
        x = qkv.view(2, 5, 8, 6).transpose(1, 2)  # (B, heads, T, D)
        first, second = x[:, :6].chunk(2, dim=-1)
        rotated = x[:, :6] * cos + torch.cat((-second, first), dim=-1) * sin
        theirs = [rotated[:, :4], rotated[:, 4:], x[:, 6:]]
        theirs.append(torch.autograd.grad(theirs, qkv, grads)[0])
    return list(zip(ours, theirs))
