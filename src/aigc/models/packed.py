"""`Linear`: an `nn.Linear` that, for inference on the CPU, multiplies by a oneDNN-packed copy of its weight.

Why: PyTorch's `F.linear` hands a float32 product to MKL, whose GEMM copies the weight into its
blocked layout inside every call; oneDNN packs it once and picks kernels for the CPU's features
(AVX-512 where there is one). Measured on SmolLM2-135M's layer shapes (docs/benchmarks.md), the
products of a decode step run 1.6x faster at one row and 1.9x at sixteen; the whole decode loop and
prefill gain with them. The results equal `F.linear` up to float32 rounding. For one or two rows a
plain loop compiled on this machine is faster still (`native.py`): it is used when it could be built.

When: only in eval mode with autograd off, for a float32 input on the CPU, and when this PyTorch
build has the ops (`onednn_linear_available`). Anything else is the plain `nn.Linear` path: training
and every GPU never see a packed copy.

Keeping the copy right: the copy is made on first use and kept while the weight is the same tensor
with the same version and storage. A fused optimizer step changes a weight without bumping its
version, so switching mode (`model.train()` / `model.eval()`, which every training loop does around
its steps) drops the copy too. An `eval()` of a model already in eval mode keeps it: `generate` calls
one per batch, and packing SmolLM2's 540 MB takes 0.27 s. Cost: a second copy of the weights in
memory while packed.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from aigc.models import native

# oneDNN tunes the packed layout for this many input rows; any row count gives the same result, and
# 16 was the fastest hint at 1, 4, 16 and 64 rows (docs/benchmarks.md).
TUNED_ROWS = 16


@functools.lru_cache(maxsize=1)
def onednn_linear_available() -> bool:
    """Whether this PyTorch build has oneDNN's packed linear ops and they compute correctly."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(2, 3)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, TUNED_ROWS)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), packed, None, "none", [], "")
    except (AttributeError, RuntimeError):  # op missing from this build, or rejected by it
        return False
    return bool(torch.equal(out, torch.full((1, 2), 3.0)))


class PackedCopy:
    """The packed weight and what it was packed from. A copy of a model gets an empty one: packed
    tensors have no storage that `copy.deepcopy` or pickling could copy."""

    def __init__(self) -> None:
        self.packed: torch.Tensor | None = None
        self.key: tuple | None = None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        state = (weight._version, weight.data_ptr())
        if self.key is None or self.key[0] is not weight or self.key[1] != state:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), TUNED_ROWS)
            self.key = (weight, state)
        return self.packed

    def clear(self) -> None:
        self.packed = self.key = None

    def __deepcopy__(self, memo) -> PackedCopy:
        return PackedCopy()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()


def can_pack(module: nn.Module, x: torch.Tensor) -> bool:
    weight = module.weight
    return (
        not module.training
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and onednn_linear_available()
    )


class Linear(nn.Linear):
    """`nn.Linear` with the same parameters and state-dict keys; see the module docstring for when
    its forward uses the packed copy."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.packed_copy = PackedCopy()

    def train(self, mode: bool = True) -> Linear:
        if mode != self.training:  # the weights may change from here on (or have changed until now)
            self.packed_copy.clear()
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not can_pack(self, x):
            return F.linear(x, self.weight, self.bias)
        rows = x.reshape(-1, x.shape[-1])  # (N, C_in)
        kernels = native.kernels() if rows.shape[0] <= native.MAX_ROWS and self.weight.is_contiguous() else None
        if kernels is not None:  # one or two rows (a decode step): stream the plain weight, no packed copy
            out = kernels.linear(rows.contiguous(), self.weight, self.bias)
        else:
            out = torch.ops.mkldnn._linear_pointwise(rows, self.packed_copy.get(self.weight), self.bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])  # (..., C_out)


def to_plain_linears(model: nn.Module) -> nn.Module:
    """Swap every `Linear` for an `nn.Linear` holding the same parameters, in place: for tools that
    match layers by exact type (torch.ao's `quantize_dynamic`)."""
    for name, module in list(model.named_modules()):
        if type(module) is Linear:
            plain = nn.Linear(1, 1, bias=False, device="meta")
            plain.in_features, plain.out_features = module.in_features, module.out_features
            plain.weight, plain.bias = module.weight, module.bias
            plain.train(module.training)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, plain)
    return model
