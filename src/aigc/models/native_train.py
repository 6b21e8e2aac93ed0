"""The training step's elementwise passes from `native.c`: RMSNorm and SwiGLU, forward and backward, in
float32 and bfloat16, one pass over memory each.

Why: in PyTorch each of these is several ops (RMSNorm's forward five and its backward seven, SwiGLU's
backward three and a concatenation), each a pass over a (B, T, width) tensor, and on a 2-core CPU a
LoRA step of SmolLM2-135M spends more time in such passes than in its matrix products. One C loop per
row does the same arithmetic with the row in L1: forward + backward at batch 4 x 128 (one thread,
2-core Xeon with AMX, 2026-12-03) SwiGLU 1.1 ms against 5.5 (fp32) and 1.6 against 4.3 (bf16),
RMSNorm 0.22 against 1.33 (fp32) and 0.26 against 1.34 (bf16) for `aigc.models.fused`'s PyTorch
functions, which remain the fallback (docs/benchmarks.md has the whole step).

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


def rms_norm_forward(kernels, x: torch.Tensor, weight: torch.Tensor, eps: float):
    """y = x / rms(x) * weight over the last dim, and the (rows,) float32 reciprocal rms for the backward."""
    rows, width = x.numel() // x.shape[-1], x.shape[-1]
    assert weight.shape == (width,), (weight.shape, width)
    y, rstd = torch.empty_like(x), x.new_empty(rows, dtype=torch.float32)
    run = _call(kernels, "rms_norm_forward", x.dtype)
    run(x.data_ptr(), weight.data_ptr(), y.data_ptr(), rstd.data_ptr(), rows, width, eps, _threads(x))
    return y, rstd


def rms_norm_backward(kernels, x, weight, rstd, grad) -> torch.Tensor:
    """The input's gradient of `rms_norm_forward` for `grad` shaped like x."""
    rows, width = x.numel() // x.shape[-1], x.shape[-1]
    assert grad.shape == x.shape and rstd.numel() == rows
    out = torch.empty_like(x)
    run = _call(kernels, "rms_norm_backward", x.dtype)
    run(x.data_ptr(), weight.data_ptr(), rstd.data_ptr(), grad.data_ptr(), out.data_ptr(), rows, width, _threads(x))
    return out


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
        y, rstd = rms_norm_forward(kernels, x.to(dtype), weight.to(dtype), 1e-5)
        ours = [y, rms_norm_backward(kernels, x.to(dtype), weight.to(dtype), rstd, g_x.to(dtype))]
        ours += [swiglu_forward(kernels, h.to(dtype)), swiglu_backward(kernels, h.to(dtype), g_h.to(dtype))]
        with torch.enable_grad():  # the first use may come inside an autograd Function's forward
            x.requires_grad_(), h.requires_grad_()
            ref_y, ref_s = F.rms_norm(x, (45,), weight, 1e-5), F.silu(h[:, :37]) * h[:, 37:]
            theirs = [ref_y, torch.autograd.grad(ref_y, x, g_x)[0], ref_s, torch.autograd.grad(ref_s, h, g_h)[0]]
        for a, b in zip(ours, theirs):
            if not torch.allclose(a.float(), b.detach(), rtol=tolerance, atol=tolerance):
                native.log.warning("aigc: native training kernels compute wrong results here; using PyTorch's")
                return None
    return kernels
