"""Block-quantised weights under autograd: what LoRA training on a quantised base (QLoRA, Dettmers
et al. 2023) needs from a frozen `QuantLinear`.

The base weights never train, but the gradient must flow through them to the adapters and new rows
below: grad_x = grad_y W. `frozen_product` is y = x W^T as an autograd function that keeps nothing
of W: the forward expands the layer's blocks in the compute dtype (bf16 under bf16 autocast), multiplies
and drops the expansion; the backward expands them again. So at most one layer is held expanded at a
time, never a float copy of the model. Keeping the forward's expansion for the backward would save
the second expansion but hold every layer's expanded weight for the whole step: the fp32 model we
avoid. SmolLM2-135M Q4_0, one LoRA r16 step: docs/benchmarks.md has the timings and memory.

`expanded` writes the weight tile by tile (`quant.TILE_FLOATS` floats at a time, through the native
dequantiser where it was built, else `qblocks.dequantize`): into bf16 the native kernels write each
block's rounded values directly; other dtypes go through one float32 tile at a time.
"""

from __future__ import annotations

import torch

from aigc.models import quant
from aigc.models.fused import compute_dtype, no_autocast
from aigc.models.qblocks import dequantize


def expanded(parts: list[tuple[str, torch.Tensor]], cols: int, dtype: torch.dtype) -> torch.Tensor:
    """The (rows, cols) weight of a layer held as `parts` ((type, blocks) row ranges), in `dtype`."""
    rows = sum(data.shape[0] for _, data in parts)
    device = parts[0][1].device
    out = torch.empty(rows, cols, dtype=dtype, device=device)
    kernels = quant.kernels() if device.type == "cpu" else None
    step, first = max(1, quant.TILE_FLOATS // cols), 0
    for type_name, data in parts:
        for start in range(0, data.shape[0], step):
            chunk = data[start : start + step]  # (n, row_bytes) uint8, or (n, cols) float32
            rows_out = out[first + start : first + start + chunk.shape[0]]
            if type_name != "F32" and dtype == torch.bfloat16 and kernels is not None and chunk.is_contiguous():
                kernels.dequantize_bf16_into(chunk, type_name, rows_out)  # no float32 tile in between
                continue
            if type_name == "F32":
                tile = chunk
            elif kernels is not None and chunk.is_contiguous():
                tile = kernels.dequantize(chunk, type_name, cols)
            else:
                tile = dequantize(chunk, type_name, cols)
            rows_out.copy_(tile)  # cast to dtype on the copy
        first += data.shape[0]
    return out


class _FrozenProduct(torch.autograd.Function):
    """y = x W^T for a frozen quantised W (out, in), computed in `dtype`; backward gives x's gradient
    only, grad_y W, from a second transient expansion of W."""

    @staticmethod
    @no_autocast
    def forward(ctx, x, layer, dtype):  # x (N, in)
        ctx.layer, ctx.dtype, ctx.x_dtype = layer, dtype, x.dtype
        return x.to(dtype) @ layer.dequantized(dtype).T  # (N, out)

    @staticmethod
    def backward(ctx, grad):  # grad (N, out)
        weight = ctx.layer.dequantized(ctx.dtype)  # (out, in)
        return (grad.to(ctx.dtype) @ weight).to(ctx.x_dtype), None, None


def frozen_product(x: torch.Tensor, layer) -> torch.Tensor:
    """x (N, in) W^T of `layer` (a `QuantLinear`) in the compute dtype, differentiable in x."""
    return _FrozenProduct.apply(x, layer, compute_dtype(x))
