"""A float32 matrix-vector product compiled on this machine, for decoding one or two rows on the CPU.

Why hand-write what oneDNN and MKL do: decoding one row reads every weight once per token, so its
speed is the speed at which the weights stream from memory. On SmolLM2-135M's 121 products of one
decode step (2-core AVX-512 EPYC, 2 threads; `benchmarks/bench_gemv.py`, figures in
docs/benchmarks.md), oneDNN's packed kernels stream 20 GB/s and MKL's 11 GB/s; the plain loop in
`gemv.c`, vectorised by the compiler for this CPU, streams 26-31 GB/s, near the 30 GB/s of a
`torch.sum` over the same bytes. At 4 rows the two are close and from 8 rows oneDNN's blocked kernels
win, so `packed.Linear` calls this for at most `MAX_ROWS` rows.

How: `gemv.c` (beside this file) is compiled by the C compiler (`$CC`, else `cc`) with
`-O3 -march=native -fopenmp` into `$AIGC_HOME/kernels` (by default `~/.cache/aigc/kernels`) under
a name hashed from the source, the compiler, its flags and this CPU, so a home folder shared by
different machines never hands one the other's build. The library is written to a temp file and
renamed (two processes may build at once), loaded with ctypes (which releases the GIL
during the call) and checked against `F.linear` before first use. Each call passes PyTorch's thread
count, so `torch.set_num_threads` governs it as it governs PyTorch's own kernels.

Fallback, always tested: with `AIGC_NATIVE_KERNELS=0`, no compiler, a failed build or a wrong check
product, `kernel()` is None (`unavailable_reason()` says why) and `packed.Linear` keeps to oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from aigc.artifacts.run import aigc_home
from aigc.errors import AigcError
from aigc.fsutil import atomic_path

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# Input rows up to which this clearly beats oneDNN's packed kernels (1 and 2 rows: 1.3-1.5x; 4: 1.1x).
MAX_ROWS = 2
# Below this many weights a product is too small for threads to pay for waking up.
THREADED_WEIGHTS = 1 << 16
BUILD_TIMEOUT_S = 120


class KernelUnavailable(Exception):
    """The native kernel cannot be built or loaded here; the message says why."""


class Gemv:
    """The loaded `aigc_gemv_f32`: `gemv(x, weight, bias)` equals `F.linear` up to float32 rounding."""

    def __init__(self, library_path: Path):
        self.library_path = library_path
        self._function = ctypes.CDLL(str(library_path)).aigc_gemv_f32
        self._function.restype = None
        self._function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3 + [ctypes.c_int]

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (N, C_in) float32 -> (N, C_out); weight (C_out, C_in), both contiguous on the CPU."""
        rows, n_in = x.shape
        n_out = weight.shape[0]
        if not (x.is_contiguous() and weight.is_contiguous() and (bias is None or bias.is_contiguous())):
            raise ValueError("gemv needs contiguous x, weight and bias")
        out = torch.empty(rows, n_out, dtype=torch.float32)
        threads = torch.get_num_threads() if weight.numel() >= THREADED_WEIGHTS else 1
        bias_pointer = None if bias is None else bias.data_ptr()
        self._function(weight.data_ptr(), x.data_ptr(), bias_pointer, out.data_ptr(), rows, n_out, n_in, threads)
        return out


def cpu_identity() -> str:
    """This CPU's model and feature flags: what `-march=native` compiles for."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    wanted = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return platform.machine() + "\n" + "\n".join(sorted(set(wanted)))


def build(kernels_dir: Path, compiler: str) -> Gemv:
    """Compile `gemv.c` into `kernels_dir` unless a build for this source, compiler and CPU is there; load it."""
    compiler_path = shutil.which(compiler)
    if compiler_path is None:
        raise KernelUnavailable(f"no C compiler {compiler!r} on PATH (set CC to one)")
    key = hashlib.sha256(
        b"\0".join([SOURCE.read_bytes(), compiler_path.encode(), " ".join(FLAGS).encode(), cpu_identity().encode()])
    ).hexdigest()[:16]
    library = kernels_dir / f"gemv-{key}.so"
    if not library.exists():
        try:
            with atomic_path(library) as tmp:
                _compile(compiler_path, tmp)
        except (OSError, AigcError) as error:
            raise KernelUnavailable(f"cannot write the kernel to {library.parent}: {error}") from error
    try:
        gemv = Gemv(library)
    except (OSError, AttributeError) as error:  # not loadable here, or not our function
        raise KernelUnavailable(f"cannot load {library}: {error}") from error
    _check(gemv)
    return gemv


def _compile(compiler_path: str, output: Path) -> None:
    command = [compiler_path, *FLAGS, str(SOURCE), "-o", str(output)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise KernelUnavailable(f"compiling {SOURCE.name} took over {BUILD_TIMEOUT_S} s") from error
    if done.returncode != 0:
        first_line = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise KernelUnavailable(f"{Path(compiler_path).name} failed on {SOURCE.name}: {first_line}")


def _check(gemv: Gemv) -> None:
    """Compare with F.linear on a product with an odd width (the vector loop's tail) and a bias."""
    generator = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(67, 45, generator=generator), torch.randn(67, generator=generator)
    for rows in (1, MAX_ROWS):
        x = torch.randn(rows, 45, generator=generator)
        if not torch.allclose(gemv(x, weight, bias), F.linear(x, weight, bias), rtol=1e-4, atol=1e-4):
            raise KernelUnavailable(f"{gemv.library_path.name} computes wrong products on this machine")


_unavailable_reason = ""


@functools.lru_cache(maxsize=1)
def kernel() -> Gemv | None:
    """The kernel for this process (built or loaded once), or None when it cannot be had here."""
    global _unavailable_reason
    if os.environ.get("AIGC_NATIVE_KERNELS", "1") == "0":
        _unavailable_reason = "turned off by AIGC_NATIVE_KERNELS=0"
        return None
    try:
        return build(aigc_home() / "kernels", os.environ.get("CC") or "cc")
    except KernelUnavailable as error:
        _unavailable_reason = str(error)
        return None


def unavailable_reason() -> str:
    """Why `kernel()` is None ("" when it is not, or has not been asked for yet)."""
    return _unavailable_reason
