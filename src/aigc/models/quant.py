"""Native kernels over block-quantised weights (`quant.c`): products of up to `PRODUCT_ROWS` rows,
and the expansion of rows to float32 that larger products hand to PyTorch's GEMM.

Why: decoding one row reads every weight once per token and is bound by memory bandwidth, so fewer
bytes per weight (4.5 for Q4_0 against 32 for float32) means faster tokens; expanding blocks in
registers, never in memory, keeps that gain. For a prefill (many rows) the arithmetic dominates: a
layer is expanded to float32 in tiles of `TILE_FLOATS` and multiplied by PyTorch's GEMM.

Built as `native.py` builds its kernels (compiled on first use into `$AIGC_HOME/kernels` under a
name hashed from the source, compiler, flags and CPU; written atomically; checked against the
PyTorch dequantiser `qblocks.dequantize` before first use), but twice: "native" (-march=native:
AVX-512 and VNNI where the CPU has them) and "avx2" (-march=haswell). `AIGC_QUANT_ISA=avx2` picks
the AVX2 build (the tests force it so that both paths are covered on an AVX-512 machine);
`AIGC_NATIVE_KERNELS=0` turns both off, and the PyTorch fallback computes instead.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from aigc.artifacts.run import aigc_home
from aigc.errors import AigcError
from aigc.fsutil import atomic_path
from aigc.models.native import KernelUnavailable, cpu_identity
from aigc.models.qblocks import QUANTISED, TYPES, dequantize

SOURCE = Path(__file__).with_name("quant.c")
ISA_FLAGS = {"native": ("-march=native", "-mtune=native"), "avx2": ("-march=haswell", "-mtune=haswell")}
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC")
# Up to this many rows a product streams the blocks through the kernel (expanding each block once per
# 8 rows); more rows (a prefill) expand the layer in tiles for PyTorch's GEMM. SmolLM2-135M Q4_0 decode
# steps, one thread under load: 201 ms against the tiles' 574 at batch 8, 322 against 477 at batch 16.
PRODUCT_ROWS = 32
TILE_FLOATS = 1 << 21  # 8 MB of float32 per expanded tile of a larger product
THREADED_WEIGHTS = 1 << 16  # below this many weights threads do not pay for waking up
BUILD_TIMEOUT_S = 120


class QuantKernels:
    """The loaded library; methods take the stored blocks (uint8, contiguous) and float32 CPU inputs."""

    def __init__(self, library_path: Path, isa: str):
        self.library_path, self.isa = library_path, isa
        library = ctypes.CDLL(str(library_path))
        pointer, size, count = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        self._gemv, self._dequant, self._dequant_bf16 = {}, {}, {}
        for name in QUANTISED:
            gemv, dequant, bf16 = (
                getattr(library, f"aigc_gemv_{name.lower()}"),
                getattr(library, f"aigc_dequant_{name.lower()}"),
                getattr(library, f"aigc_dequant_bf16_{name.lower()}"),
            )
            gemv.restype, gemv.argtypes = None, [pointer] * 3 + [size] * 4 + [count]
            dequant.restype, dequant.argtypes = None, [pointer] * 2 + [size] * 2 + [count]
            bf16.restype, bf16.argtypes = None, [pointer] * 2 + [size] * 3 + [count]
            self._gemv[name], self._dequant[name], self._dequant_bf16[name] = gemv, dequant, bf16

    def gemv(self, blocks: torch.Tensor, type_name: str, x: torch.Tensor, out: torch.Tensor, column: int) -> None:
        """out[:, column : column + n_out] = x W^T for W (n_out, n_in) of `type_name` blocks;
        x (rows, n_in) contiguous, out (rows, width) contiguous float32."""
        rows, n_in = x.shape
        n_out = blocks.shape[0]
        fits = blocks.shape[1] == TYPES[type_name].row_bytes(n_in) and n_in % TYPES[type_name].block == 0
        _require(_plain(x, out) and blocks.dtype == torch.uint8 and blocks.is_contiguous(), "contiguous inputs")
        _require(fits and out.shape[0] == rows and column + n_out <= out.shape[1], "shapes")
        pointer = out.data_ptr() + 4 * column
        threads = _threads(n_out * n_in)
        self._gemv[type_name](blocks.data_ptr(), x.data_ptr(), pointer, rows, n_out, n_in, out.shape[1], threads)

    def dequantize(self, blocks: torch.Tensor, type_name: str, n_in: int) -> torch.Tensor:
        """uint8 (n_out, row_bytes) blocks -> float32 (n_out, n_in)."""
        fits = blocks.dim() == 2 and blocks.shape[1] == TYPES[type_name].row_bytes(n_in)
        _require(fits and n_in % TYPES[type_name].block == 0, "shapes")
        _require(blocks.dtype == torch.uint8 and blocks.is_contiguous() and blocks.is_cpu, "contiguous inputs")
        out = torch.empty(blocks.shape[0], n_in, dtype=torch.float32)
        self._dequant[type_name](blocks.data_ptr(), out.data_ptr(), blocks.shape[0], n_in, _threads(out.numel()))
        return out

    def dequantize_bf16_into(self, blocks: torch.Tensor, type_name: str, out: torch.Tensor) -> None:
        """uint8 (n_out, row_bytes) blocks -> `out`, bf16 (n_out, n_in) rows of unit stride (the rows of
        a larger tensor may be given), rounded as `.to(torch.bfloat16)` rounds the float32 expansion."""
        n_out, n_in = out.shape
        fits = blocks.dim() == 2 and blocks.shape == (n_out, TYPES[type_name].row_bytes(n_in))
        _require(fits and n_in % TYPES[type_name].block == 0, "shapes")
        _require(blocks.dtype == torch.uint8 and blocks.is_contiguous() and blocks.is_cpu, "contiguous inputs")
        _require(out.dtype == torch.bfloat16 and out.is_cpu and out.stride(1) == 1, "a bf16 output of unit stride")
        function = self._dequant_bf16[type_name]
        function(blocks.data_ptr(), out.data_ptr(), n_out, n_in, out.stride(0), _threads(out.numel()))


def _threads(weights: int) -> int:
    return torch.get_num_threads() if weights >= THREADED_WEIGHTS else 1


def _plain(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.is_cpu and t.is_contiguous() for t in tensors)


def _require(condition: bool, problem: str) -> None:
    """A wrong argument would make the C code read or write out of bounds: refuse it here."""
    if not condition:
        raise ValueError(f"quantised kernel: wrong {problem}")


def build(kernels_dir: Path, compiler: str, isa: str) -> QuantKernels:
    """Compile `quant.c` for `isa` into `kernels_dir` unless that build is there; load and check it."""
    compiler_path = shutil.which(compiler)
    if compiler_path is None:
        raise KernelUnavailable(f"no C compiler {compiler!r} on PATH (set CC to one)")
    flags = (*ISA_FLAGS[isa], *COMMON_FLAGS)
    parts = [SOURCE.read_bytes(), compiler_path.encode(), " ".join(flags).encode(), cpu_identity().encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    library = kernels_dir / f"quant-{isa}-{key}.so"
    if not library.exists():
        try:
            with atomic_path(library) as tmp:
                _compile(compiler_path, flags, tmp)
        except (OSError, AigcError) as error:
            raise KernelUnavailable(f"cannot write the kernels to {library.parent}: {error}") from error
    try:
        kernels = QuantKernels(library, isa)
    except (OSError, AttributeError) as error:
        raise KernelUnavailable(f"cannot load {library}: {error}") from error
    # The first use may come inside a training step: the check's reference product must stay float32.
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        _check(kernels)
    return kernels


def _compile(compiler_path: str, flags: tuple[str, ...], output: Path) -> None:
    command = [compiler_path, *flags, str(SOURCE), "-o", str(output)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise KernelUnavailable(f"compiling {SOURCE.name} took over {BUILD_TIMEOUT_S} s") from error
    if done.returncode != 0:
        first_line = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise KernelUnavailable(f"{Path(compiler_path).name} failed on {SOURCE.name}: {first_line}")


CHECK_ROWS = 15  # 8 + 4 + 2 + 1: every row-group kernel


def _check(kernels: QuantKernels) -> None:
    """Every type's kernels against the PyTorch dequantiser on random blocks with sane scales."""
    generator = torch.Generator().manual_seed(0)
    for name in QUANTISED:
        kind = TYPES[name]
        n_out, n_in = 5, 2 * kind.block
        blocks = random_blocks(name, n_out, n_in, generator)
        x = torch.randn(CHECK_ROWS, n_in, generator=generator)
        expected = dequantize(blocks, name, n_in)
        out = torch.zeros(CHECK_ROWS, n_out + 1)
        kernels.gemv(blocks, name, x, out, 1)
        wrong_product = not torch.allclose(out[:, 1:], x @ expected.T, rtol=1e-4, atol=1e-4)
        bf16 = torch.empty(n_out, n_in, dtype=torch.bfloat16)
        kernels.dequantize_bf16_into(blocks, name, bf16)
        wrong_expansion = not torch.equal(kernels.dequantize(blocks, name, n_in), expected)
        if wrong_product or wrong_expansion or not torch.equal(bf16, expected.to(torch.bfloat16)):
            raise KernelUnavailable(f"{kernels.library_path.name} computes {name} wrong on this machine")


# Byte offsets of each type's fp16 fields (scales, offsets), which random bytes could make inf or NaN.
HALF_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2)}
HALF_FIELDS |= {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_blocks(type_name: str, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """Valid random blocks of (rows, cols) weights: random bytes, with small finite fp16 scales."""
    kind = TYPES[type_name]
    count = rows * cols // kind.block
    blocks = torch.randint(0, 256, (count, kind.nbytes), dtype=torch.uint8, generator=generator)
    for at in HALF_FIELDS[type_name]:
        scales = (torch.rand(count, 1, generator=generator) * 0.02 + 1e-3).half()
        blocks[:, at : at + 2] = scales.view(torch.uint8)
    return blocks.view(rows, -1)


_unavailable_reason = ""


@functools.lru_cache(maxsize=2)
def _kernels_for(isa: str) -> QuantKernels | None:
    global _unavailable_reason
    if os.environ.get("AIGC_NATIVE_KERNELS", "1") == "0":
        _unavailable_reason = "turned off by AIGC_NATIVE_KERNELS=0"
        return None
    try:
        return build(aigc_home() / "kernels", os.environ.get("CC") or "cc", isa)
    except KernelUnavailable as error:
        _unavailable_reason = str(error)
        return None


def kernels() -> QuantKernels | None:
    """This process's kernels for the instruction set `AIGC_QUANT_ISA` names (native, or avx2), or None."""
    isa = os.environ.get("AIGC_QUANT_ISA", "native")
    if isa not in ISA_FLAGS:
        raise AigcError(f"AIGC_QUANT_ISA={isa!r} is not known; use one of {', '.join(ISA_FLAGS)}")
    return _kernels_for(isa)


def unavailable_reason() -> str:
    return _unavailable_reason
