"""The layers of a quantised run: `QuantLinear` and `QuantEmbedding` compute with GGML blocks as
GGUF holds them (the weights file and its loader are `qlinear.py`; the layout is described there).

A product of up to `quant.PRODUCT_ROWS` rows streams the blocks through the native kernels
(`quant.py`), a larger one expands one tile of rows at a time, and without the kernels (GPU,
autocast, `AIGC_NATIVE_KERNELS=0`) each call expands one layer in the compute dtype
(`qgrad.expanded`), used for that call only. With gradients needed for the input (LoRA training on
a quantised base) the product is `qgrad.frozen_product`, which expands the layer again in the
backward pass instead of keeping it. Nothing float32-sized is kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from aigc.models import qgrad, quant
from aigc.models.fused import compute_dtype
from aigc.models.packed import Linear
from aigc.models.qblocks import dequantize


@dataclass(frozen=True)
class Part:
    """Rows of one layer's weight: uint8 blocks (rows, row_bytes) of `type`, or float32 (rows, cols)."""

    type: str
    data: torch.Tensor
    rows: int
    cols: int


def _fast(x: torch.Tensor) -> quant.QuantKernels | None:
    """The native kernels for a float32 CPU input in inference (autograd and autocast off), else None."""
    if torch.is_grad_enabled() or not x.is_cpu or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return None
    return quant.kernels()


class _BlockParts(nn.Module):
    """A module whose weight is the row-wise concatenation of quantised parts, held as buffers
    `weight_0`, `weight_1`, ... (views of the run's memory-mapped file)."""

    def _hold(self, parts: list[Part]) -> None:
        self.types = [p.type for p in parts]
        for i, part in enumerate(parts):
            self.register_buffer(f"weight_{i}", part.data)

    def parts(self) -> list[tuple[str, torch.Tensor]]:
        return [(t, getattr(self, f"weight_{i}")) for i, t in enumerate(self.types)]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole (rows, cols) weight expanded in `dtype`: a fresh tensor, for one use."""
        return qgrad.expanded(self.parts(), self._cols(), dtype)

    def shares_blocks(self, other: nn.Module) -> bool:
        """True when `other` holds the very same blocks (a tied output layer and embedding)."""
        return isinstance(other, _BlockParts) and self.weight_0 is other.weight_0

    def weight_count(self) -> int:
        return sum(data.shape[0] for _, data in self.parts()) * self._cols()


class QuantLinear(_BlockParts):
    """y = x W^T + b with W the row-wise concatenation of quantised parts; W is never stored expanded."""

    def __init__(self, parts: list[Part], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = parts[0].cols
        self.out_features = sum(p.rows for p in parts)
        self._hold(parts)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (N, in)
        kernels = _fast(rows)
        if torch.is_grad_enabled() and rows.requires_grad:  # training through the frozen layer
            out = qgrad.frozen_product(rows, self)
        elif kernels is None:
            dtype = compute_dtype(rows)
            out = F.linear(rows.to(dtype), self.dequantized(dtype))
        elif rows.shape[0] <= quant.PRODUCT_ROWS:  # decode steps: stream the blocks through the kernel
            out = self._product(kernels, rows.contiguous())
        else:
            out = self._tiled(kernels, rows)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)

    def _cols(self) -> int:
        return self.in_features

    def weight_parts(self, dtype: torch.dtype) -> tuple[torch.Tensor]:
        """The output layer's weight for `fused.linear_cross_entropy`, expanded in `dtype` for this step."""
        return (self.dequantized(dtype),)

    def _product(self, kernels: quant.QuantKernels, rows: torch.Tensor) -> torch.Tensor:
        """(N, in) -> (N, out) through the kernels' checked plan of this layer's parts, made again when
        the kernels or the buffers change (`.to()`, `load_state_dict` with new tensors)."""
        plan = self.__dict__.get("_plan")
        if plan is None or not plan.holds(kernels, self._buffers.values()):
            plan = self.__dict__["_plan"] = kernels.plan(self.parts(), self.in_features)
        return plan.multiply(rows)

    def __getstate__(self) -> dict:
        """Copies and pickles leave the plan (ctypes functions) behind; the first product makes it again."""
        return {key: value for key, value in self.__dict__.items() if key != "_plan"}

    def _tiled(self, kernels: quant.QuantKernels, rows: torch.Tensor) -> torch.Tensor:
        """Many rows: expand `quant.TILE_FLOATS` weights at a time and let PyTorch's GEMM multiply, in
        `quant.tile_dtype()` (bf16 on AMX; float32 parts always in float32)."""
        dtype = quant.tile_dtype()
        out = torch.empty(rows.shape[0], self.out_features)  # (N, out)
        x = rows.to(dtype)  # (N, in); rows itself for float32
        column, step = 0, max(1, quant.TILE_FLOATS // self.in_features)
        for type_name, data in self.parts():
            for start in range(0, data.shape[0], step):
                chunk = data[start : start + step]
                if type_name == "F32":
                    product = rows @ chunk.T
                elif dtype == torch.float32:
                    product = rows @ kernels.dequantize(chunk, type_name, self.in_features).T
                else:
                    weight = torch.empty(chunk.shape[0], self.in_features, dtype=dtype)
                    kernels.dequantize_bf16_into(chunk, type_name, weight)
                    product = x @ weight.T
                out[:, column + start : column + start + chunk.shape[0]] = product
            column += data.shape[0]
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, types={self.types}"


class QuantEmbedding(_BlockParts):
    """nn.Embedding over quantised rows: each call expands only the rows it looks up, in `dtype`
    (float32; `lora.hold_frozen_in` sets bf16 so that a bf16 run's residual stream is bf16, as a
    float table held in bf16 makes it)."""

    def __init__(self, parts: list[Part]) -> None:
        super().__init__()
        self.embedding_dim = parts[0].cols
        self.num_embeddings = sum(p.rows for p in parts)
        self.dtype = torch.float32
        self._hold(parts)

    def _cols(self) -> int:
        return self.embedding_dim

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)  # (N,)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id outside the embedding's {self.num_embeddings} rows")
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=self.dtype, device=idx.device)
        start = 0
        for type_name, data in self.parts():
            inside = (flat >= start) & (flat < start + data.shape[0])
            if bool(inside.any()):
                out[inside] = dequantize(data[flat[inside] - start], type_name, self.embedding_dim).to(out)
            start += data.shape[0]
        return out.view(*idx.shape, self.embedding_dim)


def expand_quantised(model: nn.Module) -> nn.Module:
    """Replace every quantised layer of `model` by its float32 form, in place (a tied output layer
    stays tied): how a LoRA run over a quantised base is merged into a plain run."""
    head = getattr(model, "lm_head", None)
    tied = isinstance(head, QuantLinear) and head.shares_blocks(getattr(model, "wte", None))
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantEmbedding):
            new = nn.Embedding.from_pretrained(module.dequantized(), freeze=False)
        elif isinstance(module, QuantLinear):
            new = Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                new.weight.copy_(module.dequantized())
                if module.bias is not None:
                    new.bias.copy_(module.bias)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    if tied:
        model.lm_head.weight = model.wte.weight
    return model


def quantised_weights(model: nn.Module) -> int:
    """How many weights the model holds in blocks (a tied table once): they are buffers, not parameters."""
    layers = {id(m.weight_0): m for m in model.modules() if isinstance(m, _BlockParts)}
    return sum(m.weight_count() for m in layers.values())
