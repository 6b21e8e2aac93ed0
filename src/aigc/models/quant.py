"""Native kernels over block-quantised weights: products of up to `PRODUCT_ROWS` rows, and the
expansion of rows to float32 that larger products hand to PyTorch's GEMM.

Why: decoding one row reads every weight once per token and is bound by memory bandwidth, so fewer
bytes per weight (4.5 for Q4_0 against 32 for float32) means faster tokens; expanding blocks in
registers, never in memory, keeps that gain. For a prefill (many rows) the arithmetic dominates: a
layer is expanded to float32 in tiles of `TILE_FLOATS` and multiplied by PyTorch's GEMM.

Two kinds of product: `qdot.c` rounds the activation rows to 8-bit blocks of 32 (`round_activations`)
and multiplies in integers (AVX-512 VNNI or AVX-VNNI where the build has them, AVX2 otherwise), the
default wherever the build has AVX2; `quant.c` expands each block to float32 and multiplies in float32,
equal to "dequantise, then F.linear" up to float rounding (`AIGC_QUANT_ACTIVATIONS=float` picks it, as
does a build without AVX2). Rounding moves each activation by at most half its block's step (max |x| / 254).

Built as `native.py` builds its kernels (compiled on first use into `$AIGC_HOME/kernels` under a
name hashed from the sources, compiler, flags and CPU; written atomically; checked against the
PyTorch references before first use), but twice: "native" (-march=native: AVX-512 and VNNI where
the CPU has them) and "avx2" (-march=haswell). `AIGC_QUANT_ISA=avx2` picks the AVX2 build (the tests
force it so that both paths are covered on an AVX-512 machine); `AIGC_NATIVE_KERNELS=0` turns both
off, and the PyTorch fallback computes instead. The products use `pool.c`'s threads (not OpenMP's),
as many as PyTorch has (`cores_to_pool` hands PyTorch's to the pool for a decode step). An idle
worker spins up to 1 ms on idle cores and 5 us where it finds itself descheduled (pool.c says why);
`AIGC_QUANT_SPIN_US` fixes the spin instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch

from aigc.artifacts.device import cpu_has_amx_bf16
from aigc.artifacts.run import aigc_home
from aigc.errors import AigcError
from aigc.fsutil import atomic_path
from aigc.models.native import KernelUnavailable, cpu_identity
from aigc.models.qblocks import QUANTISED, TYPES, dequantize

SOURCES = tuple(Path(__file__).with_name(name) for name in ("quant.c", "qdot.c", "pool.c", "quant.h", "pool.h"))
ISA_FLAGS = {"native": ("-march=native", "-mtune=native"), "avx2": ("-march=haswell", "-mtune=haswell")}
# -fopenmp-simd: quant.c's `omp simd` hints, without OpenMP's threads (pool.c has its own, see there)
COMMON_FLAGS = ("-O3", "-fopenmp-simd", "-pthread", "-shared", "-fPIC")
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
        self._gemv, self._dequant, self._dequant_bf16, self._qdot = {}, {}, {}, {}
        # the integer dot this build has (qdot.c), "" where it has none (no AVX2)
        self.dot = DOTS[library.aigc_qdot_isa()]
        # int8 activations and integer products where the build has them; float32 products otherwise
        self.integer = bool(self.dot) and os.environ.get("AIGC_QUANT_ACTIVATIONS", "int8") != "float"
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
            if self.dot:
                qdot = getattr(library, f"aigc_qdot_{name.lower()}")
                qdot.restype, qdot.argtypes = ctypes.c_int, [pointer] * 3 + [size] * 4 + [count]
                self._qdot[name] = qdot
        if self.dot:
            self._quantise_rows = library.aigc_quantise_rows
            self._quantise_rows.restype, self._quantise_rows.argtypes = None, [pointer] + [size] * 2 + [pointer] * 3

    def gemv(self, blocks: torch.Tensor, type_name: str, x: torch.Tensor, out: torch.Tensor, column: int) -> None:
        """out[:, column : column + n_out] = x W^T for W (n_out, n_in) of `type_name` blocks;
        x (rows, n_in) contiguous, out (rows, width) contiguous float32."""
        self.plan([(type_name, blocks)], x.shape[-1]).into(x, out, column)

    def plan(self, parts: list[tuple[str, torch.Tensor]], n_in: int) -> ProductPlan:
        """A layer's products, its parts' shapes checked once: the blocks of a loaded run do not change,
        so a decode step's call (`ProductPlan.multiply`) checks only the activations: SmolLM2 Q4_1 at
        batch 1 decoded 1-7 % faster than with the checks at each of a token's 121 products
        (docs/benchmarks.md)."""
        steps, column = [], 0
        for type_name, blocks in parts:
            if type_name == "F32":
                _require(blocks.dtype == torch.float32 and blocks.shape[1] == n_in, "shapes")
                steps.append((None, blocks, column, blocks.shape[0]))
            else:
                fits = blocks.dim() == 2 and blocks.shape[1] == TYPES[type_name].row_bytes(n_in)
                _require(fits and n_in % TYPES[type_name].block == 0, "shapes")
                _require(blocks.dtype == torch.uint8 and blocks.is_contiguous() and blocks.is_cpu, "contiguous inputs")
                function = self._qdot[type_name] if self.integer else self._gemv[type_name]
                steps.append((function, blocks, column, blocks.shape[0]))
            column += blocks.shape[0]
        return ProductPlan(self, tuple(steps), n_in, column)

    def round_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the integer products round x (rows, n_in) to: (q int8 (rows, n_in), d and s float32
        (rows, n_in / 32)); the tests hold it to `round_activations`."""
        rows, n_in = x.shape
        _require(_plain(x) and n_in % 32 == 0 and bool(self.dot), "activations")
        q, d, s = (
            torch.empty(rows, n_in, dtype=torch.int8),
            torch.empty(rows, n_in // 32),
            torch.empty(rows, n_in // 32),
        )
        self._quantise_rows(x.data_ptr(), rows, n_in, q.data_ptr(), d.data_ptr(), s.data_ptr())
        return q, d, s

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


class ProductPlan:
    """`QuantKernels.plan`'s checked products of one layer: `multiply(x)` is x W^T for x (rows, n_in)."""

    def __init__(self, kernels: QuantKernels, steps: tuple, n_in: int, n_out: int):
        self.kernels, self.steps, self.n_in, self.n_out = kernels, steps, n_in, n_out
        self.integer = kernels.integer  # which products the steps hold

    def holds(self, kernels: QuantKernels, blocks) -> bool:
        """Whether this plan is for these kernels and these very tensors (in part order)."""
        held = tuple(blocks)
        return (
            kernels is self.kernels
            and kernels.integer == self.integer
            and len(held) == len(self.steps)
            and all(tensor is step[1] for tensor, step in zip(held, self.steps))
        )

    def multiply(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, n_in) float32 -> (rows, n_out) float32."""
        out = torch.empty(x.shape[0], self.n_out)
        self.into(x, out, 0)
        return out

    def into(self, x: torch.Tensor, out: torch.Tensor, column: int) -> None:
        """out[:, column : column + n_out] = x W^T; x (rows, n_in), out (rows, width), contiguous float32."""
        rows, width = x.shape[0], out.shape[-1]
        _require(_plain(x, out) and x.dim() == 2 and x.shape[1] == self.n_in, "contiguous inputs")
        _require(out.dim() == 2 and out.shape[0] == rows and 0 <= column <= width - self.n_out, "shapes")
        x_pointer, out_pointer = x.data_ptr(), out.data_ptr() + 4 * column
        for function, blocks, start, n_out in self.steps:
            if function is None:  # a float32 part
                out[:, column + start : column + start + n_out] = torch.nn.functional.linear(x, blocks)
                continue
            arguments = (blocks.data_ptr(), x_pointer, out_pointer + 4 * start, rows, n_out, self.n_in, width)
            if function(*arguments, _threads(n_out * self.n_in)) and self.integer:
                raise MemoryError(f"no memory for {rows} x {self.n_in} rounded activations")


DOTS = {0: "", 1: "avx2", 2: "avx-vnni", 3: "avx512-vnni"}  # aigc_qdot_isa() -> name


def round_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, n_in) rounded as the integer products round it, in blocks of 32 along n_in:
    d = max|x| / 127 and q = round(x * (1 / d)) (half to even), in qdot.c's float32 steps.
    Returns (q as int8 (rows, n_in), d (rows, n_in / 32)); q * d is the x the products see, each
    value within d / 2 of the original."""
    blocks = x.reshape(x.shape[0], -1, 32)  # (rows, n_in / 32, 32)
    d = blocks.abs().amax(-1) / 127
    inverse = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inverse.unsqueeze(-1)).to(torch.int8)
    return q.reshape(x.shape), d


def rounded(x: torch.Tensor) -> torch.Tensor:
    """x (rows, n_in) as the integer products see it: float32 q * d of `round_activations`."""
    q, d = round_activations(x)
    return (q.view(x.shape[0], -1, 32).float() * d.unsqueeze(-1)).view(x.shape)


TILE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def tile_dtype() -> torch.dtype:
    """The dtype in which a larger product (a prefill) multiplies its expanded tiles: bf16 where the CPU
    has AMX, whose bf16 GEMM ran 7.6x the float32 one here, float32 elsewhere. bf16 rounds the
    activations and the products to 8 significant bits, as autocast does (the decode kernels round
    the activations to 8-bit integers). `AIGC_QUANT_TILES=float32|bfloat16` chooses instead."""
    choice = os.environ.get("AIGC_QUANT_TILES", "auto")
    if choice == "auto":
        return torch.bfloat16 if cpu_has_amx_bf16() else torch.float32
    if choice not in TILE_DTYPES:
        raise AigcError(f"AIGC_QUANT_TILES={choice!r} is not known; use auto, float32 or bfloat16")
    return TILE_DTYPES[choice]


_pool_threads: int | None = None  # set by `cores_to_pool`; None: PyTorch's thread count


def _threads(weights: int) -> int:
    if weights < THREADED_WEIGHTS:
        return 1
    return _pool_threads or torch.get_num_threads()


@contextlib.contextmanager
def cores_to_pool(rows: int) -> Iterator[None]:
    """Run a step of `rows` rows with PyTorch on one thread and the products on all of its threads.

    Why: a decode step's products take the pool's threads, and its small PyTorch ops (norms,
    attention over the cache) gain little from OpenMP's, whose idle workers spin on the same cores
    as the pool's: with both, 2 threads on a 2-core Xeon ran batch 16 at 191-292 tokens/s, with
    PyTorch on one thread at 338-387 (docs/benchmarks.md). Only for rows that the products stream
    (`PRODUCT_ROWS`): a larger step multiplies expanded tiles in PyTorch's GEMM, which wants threads.
    """
    global _pool_threads
    threads = torch.get_num_threads()
    if rows > PRODUCT_ROWS or threads == 1 or _pool_threads is not None:
        yield
        return
    _pool_threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _pool_threads = None


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
    parts = [
        *(source.read_bytes() for source in SOURCES),
        compiler_path.encode(),
        " ".join(flags).encode(),
        cpu_identity().encode(),
    ]
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
    command = [compiler_path, *flags, *(str(s) for s in SOURCES if s.suffix == ".c"), "-o", str(output)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise KernelUnavailable(f"compiling the quantised kernels took over {BUILD_TIMEOUT_S} s") from error
    if done.returncode != 0:
        first_line = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise KernelUnavailable(f"{Path(compiler_path).name} failed on the quantised kernels: {first_line}")


CHECK_ROWS = 15  # 8 + 4 + 2 + 1: every row-group kernel


def _check(kernels: QuantKernels) -> None:
    """Every type's kernels (float32 and, where built, integer products) against the PyTorch references
    on random blocks with sane scales."""
    generator = torch.Generator().manual_seed(0)
    chosen = kernels.integer
    try:
        for name in QUANTISED:
            if _wrong(kernels, name, generator):
                raise KernelUnavailable(f"{kernels.library_path.name} computes {name} wrong on this machine")
    finally:
        kernels.integer = chosen


def _wrong(kernels: QuantKernels, name: str, generator: torch.Generator) -> bool:
    """Whether one type's expansions (float32, bf16) or products (float32, integer) differ from the references."""
    kind = TYPES[name]
    n_out, n_in = 5, 2 * kind.block
    blocks = random_blocks(name, n_out, n_in, generator)
    x = torch.randn(CHECK_ROWS, n_in, generator=generator)
    expected = dequantize(blocks, name, n_in)
    bf16 = torch.empty(n_out, n_in, dtype=torch.bfloat16)
    kernels.dequantize_bf16_into(blocks, name, bf16)
    wrong = not torch.equal(kernels.dequantize(blocks, name, n_in), expected)
    wrong = wrong or not torch.equal(bf16, expected.to(torch.bfloat16))
    for integer in (False, True) if kernels.dot else (False,):
        kernels.integer = integer
        out = torch.zeros(CHECK_ROWS, n_out + 1)
        kernels.gemv(blocks, name, x, out, 1)
        seen = rounded(x) if integer else x  # the integer products see x rounded to 8 bits
        wrong = wrong or not torch.allclose(out[:, 1:], seen @ expected.T, rtol=1e-4, atol=1e-4)
    return wrong


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
