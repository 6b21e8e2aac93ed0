"""GGML block-quantised weights as PyTorch sees them: the block types, their checks, and a dequantiser.

A quantised matrix of logical shape (rows, cols) is stored as uint8 (rows, cols / QK * BYTES): each
row a run of blocks of QK weights along the input dimension, as in a GGUF file (the layouts are in
`quant.c`). `dequantize` expands such rows to float32 with PyTorch ops on any device: it is the
fallback of the native kernels (`quant.py`) and is checked against `gguf.quants.dequantize`, the
reference, in the tests. It allocates only what it returns, so a caller that expands one layer per
call never holds an fp32 copy of the whole model.

"F32" is the plain case (float32 (rows, cols)), for layers a quantised run keeps in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aigc.errors import AigcError


@dataclass(frozen=True)
class BlockType:
    name: str  # GGML's name: "Q4_K"
    ggml_id: int  # GGMLQuantizationType value
    block: int  # weights per block (QK)
    nbytes: int  # bytes per block

    def row_bytes(self, cols: int) -> int:
        return cols // self.block * self.nbytes


TYPES = {
    t.name: t
    for t in (
        BlockType("F32", 0, 1, 4),
        BlockType("Q4_0", 2, 32, 18),
        BlockType("Q4_1", 3, 32, 20),
        BlockType("Q5_0", 6, 32, 22),
        BlockType("Q5_1", 7, 32, 24),
        BlockType("Q8_0", 8, 32, 34),
        BlockType("Q4_K", 12, 256, 144),
        BlockType("Q5_K", 13, 256, 176),
        BlockType("Q6_K", 14, 256, 210),
    )
}
QUANTISED = tuple(name for name in TYPES if name != "F32")


def block_type(name: str) -> BlockType:
    if name not in TYPES:
        raise AigcError(f"weight type {name!r} is not supported; supported: {', '.join(TYPES)}")
    return TYPES[name]


def check_blocks(data: torch.Tensor, type_name: str, rows: int, cols: int, what: str) -> None:
    """Refuse stored data that does not hold (rows, cols) weights of `type_name` exactly: the kernels
    would read past its end or misalign blocks."""
    kind = block_type(type_name)
    if rows <= 0 or cols <= 0 or cols % kind.block:
        raise AigcError(f"{what}: {rows} x {cols} {type_name} weights; the width must be a multiple of {kind.block}")
    dtype = torch.float32 if type_name == "F32" else torch.uint8
    shape = (rows, cols) if type_name == "F32" else (rows, kind.row_bytes(cols))
    if data.dtype != dtype or tuple(data.shape) != shape:
        found = f"{str(data.dtype).removeprefix('torch.')} {tuple(data.shape)}"
        raise AigcError(f"{what}: {type_name} {rows} x {cols} needs {dtype} {shape}, the file holds {found}")


def _f16(blocks: torch.Tensor, at: int) -> torch.Tensor:
    """The fp16 field at byte `at` of each block (N, BYTES) -> float32 (N, 1)."""
    return blocks[:, at : at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """(N, 16) packed bytes -> (N, 32) int32: low nibbles first, then high (the 32-weight types)."""
    q = qs.to(torch.int32)
    return torch.cat((q & 15, q >> 4), dim=1)


def _high_bits(qh: torch.Tensor, count: int) -> torch.Tensor:
    """Bits 0..count-1 of the little-endian bytes qh (N, count / 8) -> (N, count) int32."""
    bits = (qh.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=qh.device)) & 1  # (N, bytes, 8)
    return bits.reshape(qh.shape[0], count)


def _q8_0(b):
    return _f16(b, 0) * b[:, 2:34].contiguous().view(torch.int8).float()


def _q4_0(b):
    return _f16(b, 0) * (_nibbles(b[:, 2:18]) - 8).float()


def _q4_1(b):
    return _f16(b, 0) * _nibbles(b[:, 4:20]).float() + _f16(b, 2)


def _q5_0(b):
    return _f16(b, 0) * ((_nibbles(b[:, 6:22]) | (_high_bits(b[:, 2:6], 32) << 4)) - 16).float()


def _q5_1(b):
    return _f16(b, 0) * (_nibbles(b[:, 8:24]) | (_high_bits(b[:, 4:8], 32) << 4)).float() + _f16(b, 2)


def _scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 6-bit scales and mins of the 8 groups of a Q4_K/Q5_K block from its 12 bytes (N, 12) -> 2 x (N, 8)."""
    s = s.to(torch.int32)
    low_sc, low_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_sc = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    high_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return torch.cat((low_sc, high_sc), 1).float(), torch.cat((low_m, high_m), 1).float()


def _k45(b, qh: torch.Tensor | None, qs: torch.Tensor):
    """Q4_K / Q5_K: group 2c is chunk c's low nibbles, 2c + 1 its high ones; Q5_K's fifth bit of
    group g is bit g of qh."""
    n = b.shape[0]
    q = qs.to(torch.int32).view(n, 4, 1, 32)
    q = torch.cat((q & 15, q >> 4), dim=2).view(n, 8, 32)  # (N, group, 32)
    if qh is not None:
        q = q | (((qh.to(torch.int32).unsqueeze(1) >> torch.arange(8, device=b.device).view(1, 8, 1)) & 1) << 4)
    sc, m = _scales_mins(b[:, 4:16])
    y = (_f16(b, 0) * sc).unsqueeze(-1) * q.float() - (_f16(b, 2) * m).unsqueeze(-1)
    return y.view(n, 256)


def _q4_k(b):
    return _k45(b, None, b[:, 16:144])


def _q5_k(b):
    return _k45(b, b[:, 16:48], b[:, 48:176])


def _q6_k(b):
    n = b.shape[0]
    ql = b[:, :128].to(torch.int32).view(n, 2, 2, 32)  # (N, half, k & 1, l)
    qh = b[:, 128:192].to(torch.int32).view(n, 2, 1, 32)  # (N, half, 1, l)
    low = torch.cat((ql & 15, ql >> 4), dim=2)  # (N, half, k, l): k = 0..3
    shifts = (2 * torch.arange(4, device=b.device)).view(1, 1, 4, 1)
    q = (low | (((qh >> shifts) & 3) << 4)) - 32  # (N, half, k, l)
    scales = b[:, 192:208].contiguous().view(torch.int8).float().view(n, 2, 4, 2, 1)  # (N, half, k, l // 16, 1)
    scale = scales.expand(n, 2, 4, 2, 16).reshape(n, 2, 4, 32)
    return ((_f16(b, 208).view(n, 1, 1, 1) * scale) * q.float()).view(n, 256)


_EXPAND = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1}
_EXPAND |= {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def dequantize(data: torch.Tensor, type_name: str, cols: int) -> torch.Tensor:
    """Rows of `type_name` blocks, uint8 (rows, row_bytes) -> float32 (rows, cols); F32 is returned as is."""
    if type_name == "F32":
        return data
    kind = TYPES[type_name]
    blocks = data.reshape(-1, kind.nbytes)  # (rows * cols / QK, BYTES)
    return _EXPAND[type_name](blocks).reshape(data.shape[0], cols)
