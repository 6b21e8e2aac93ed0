"""Float32 kernels compiled on this machine for CPU inference: small products and a decode step's
elementwise work (`native.c`, beside this file).

Why hand-write what oneDNN, MKL and PyTorch do:
- Products of one or two rows (`linear`). Decoding one row reads every weight once per token, so its
  speed is the speed at which the weights stream from memory. On SmolLM2-135M's 121 products of one
  decode step (2-core AVX-512 EPYC, 2 threads; `benchmarks/bench_gemv.py`, figures in
  docs/benchmarks.md), oneDNN's packed kernels stream 20 GB/s and MKL's 11 GB/s; the plain loop,
  vectorised by the compiler for this CPU, streams 26-31 GB/s, near the 30 GB/s of a `torch.sum`
  over the same bytes. From 8 rows oneDNN's blocked kernels win, so `packed.Linear` calls this for at
  most `MAX_ROWS` rows.
- A decode step's other work (`rms_norm`, `silu_mul`, `rope_append`, `decode_attention`). PyTorch
  spreads each over several ops (views, transposes, copies into the cache, a mask) of a few
  microseconds apiece; one call each does the same arithmetic. `benchmarks/bench_native.py` (same
  host): at batch 16 RMSNorm takes 4.7 us against 12.6, rotary + cache append 8.2 against 29.5, and a
  whole SmolLM2 decode step 41.5 ms against 48.1 (22.4 against 33.5 at batch 1, with `linear`).

How: the C compiler (`$CC`, else `cc`) builds `native.c` with `-O3 -march=native -fopenmp` into
`$AIGC_HOME/kernels` (by default `~/.cache/aigc/kernels`) under a name hashed from the source, the
compiler and its version, its flags and this CPU's model and flags, so a home folder shared by
different machines never hands one the other's build. The library is written to a temp file and
renamed (two processes may build at once); a record written after it (`native-KEY.so.json`) holds
what it was built for and its digest, and a library that does not match its record (truncated,
zeroed, bit-flipped, or no record) is built again before anything loads it. It is loaded with ctypes
(which releases the GIL during each call) and every kernel is checked against PyTorch before first
use. Calls pass PyTorch's thread count, so `torch.set_num_threads` governs them as it governs
PyTorch's own kernels.

Fallback, always tested: with `AIGC_NATIVE_KERNELS=0`, no compiler, no source, a failed build or a
wrong check result, `kernels()` is None (`unavailable_reason()` says why, and one warning on this
module's logger says it once per process, which the CLI shows as one line on stderr) and the model
keeps to PyTorch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F

from aigc.artifacts.run import aigc_home
from aigc.errors import AigcError
from aigc.fsutil import atomic_path, file_digest, write_json

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# Input rows up to which `linear` clearly beats oneDNN's packed kernels (1 and 2 rows: 1.3-1.5x; 4: 1.1x).
MAX_ROWS = 2
# Below this many floats of work (weights, or elements) threads do not pay for waking up.
THREADED_ELEMENTS = 1 << 16
BUILD_TIMEOUT_S = 120

log = logging.getLogger(__name__)


class KernelUnavailable(Exception):
    """The native kernels cannot be built or loaded here; the message says why."""


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


class Kernels:
    """The loaded library. Each method equals its PyTorch counterpart up to float32 rounding and takes
    float32 tensors on the CPU; arguments must be contiguous where the docstrings say so."""

    def __init__(self, library_path: Path):
        self.library_path = library_path
        library = ctypes.CDLL(str(library_path))
        pointer, size, count, real = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
        signatures = {
            "aigc_gemv_f32": [pointer] * 4 + [size] * 3 + [count],
            "aigc_rms_norm_f32": [pointer] * 3 + [size] * 2 + [real, count],
            "aigc_silu_mul_f32": [pointer] * 2 + [size] * 2 + [count],
            "aigc_rope_append_f32": [pointer] * 3 + [size, pointer] + [size] * 6,
            "aigc_decode_attention_f32": [pointer, size, pointer, pointer, size] + [pointer] * 2 + [size] * 6 + [count],
        }
        for suffix in ("f32", "bf16"):  # training's elementwise passes, wrapped by `native_train`
            signatures[f"aigc_rms_norm_forward_{suffix}"] = [pointer] * 6 + [size] * 2 + [real, count]
            signatures[f"aigc_rms_norm_backward_{suffix}"] = [pointer] * 6 + [size] * 2 + [count]
            signatures[f"aigc_swiglu_forward_{suffix}"] = [pointer] * 2 + [size] * 2 + [count]
            signatures[f"aigc_swiglu_backward_{suffix}"] = [pointer] * 3 + [size] * 2 + [count]
            signatures[f"aigc_qkv_rotary_{suffix}"] = [pointer] * 6 + [size] * 5 + [count]
            signatures[f"aigc_qkv_rotary_backward_{suffix}"] = [pointer] * 6 + [size] * 5 + [count]
        for name, argtypes in signatures.items():
            function = getattr(library, name)
            function.restype, function.argtypes = None, argtypes
            setattr(self, "_" + name.removeprefix("aigc_").removesuffix("_f32"), function)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`F.linear`: x (N, C_in) -> (N, C_out); weight (C_out, C_in); all contiguous."""
        rows, n_in = x.shape
        n_out = weight.shape[0]
        _require(_plain(x, weight, *([] if bias is None else [bias])), "linear needs contiguous float32 CPU tensors")
        _require(weight.shape[1] == n_in and (bias is None or bias.numel() == n_out), "linear: shapes do not match")
        out = torch.empty(rows, n_out, dtype=torch.float32)
        threads = _threads(weight.numel())
        self._gemv(weight.data_ptr(), x.data_ptr(), _pointer(bias), out.data_ptr(), rows, n_out, n_in, threads)
        return out

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """`F.rms_norm` over the last dimension of x (..., C); weight (C)."""
        x, weight = x.contiguous(), weight.contiguous()
        width = x.shape[-1]
        _require(_plain(x, weight) and weight.numel() == width, "rms_norm needs float32 CPU x (..., C) and weight (C)")
        out = torch.empty_like(x)
        rows, threads = x.numel() // width, _threads(x.numel())
        self._rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, width, eps, threads)
        return out

    def silu_mul(self, h: torch.Tensor) -> torch.Tensor:
        """SwiGLU's `F.silu(gate) * up` for h (..., 2 H) holding gate then up -> (..., H)."""
        h = h.contiguous()
        _require(_plain(h) and h.shape[-1] % 2 == 0, "silu_mul needs float32 CPU h (..., 2 H)")
        hidden = h.shape[-1] // 2
        out = h.new_empty(*h.shape[:-1], hidden)
        self._silu_mul(h.data_ptr(), out.data_ptr(), h.numel() // h.shape[-1], hidden, _threads(h.numel()))
        return out

    def rope_append(self, qkv: torch.Tensor, rope: tuple | None, kv: torch.Tensor, at: int) -> None:
        """One new token per row: rotate the queries of qkv (B, (nh + 2 nkv) hs), contiguous, in place;
        write its rotated keys and its values at position `at` of kv (2, B, nkv, capacity, hs).
        rope: cos, sin for this step, (B, hs) or (1, hs) up to extra unit dimensions, or None (no rotation)."""
        _, batch, n_kv_head, capacity, head_dim = kv.shape
        n_head = _query_heads(qkv, kv)
        _require(0 <= at < capacity, f"rope_append: position {at} outside the cache's {capacity}")
        cos, sin = (None, None) if rope is None else (r.reshape(-1, head_dim).contiguous() for r in rope)
        if cos is not None:
            rows_fit = cos.shape == sin.shape and cos.shape[0] in (1, batch)
            _require(_plain(cos, sin) and rows_fit, "rope_append: cos and sin need 1 or B float32 rows")
        stride = 0 if cos is None or cos.shape[0] == 1 else head_dim
        self._rope_append(
            qkv.data_ptr(), _pointer(cos), _pointer(sin), stride, kv.data_ptr(),
            batch, n_head, n_kv_head, head_dim, capacity, at,
        )  # fmt: skip

    def decode_attention(
        self, qkv: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor | None, length: int
    ) -> torch.Tensor:
        """Each row's one new query (the first nh heads of qkv (B, width), contiguous) attends to the
        first `length` positions of kv (2, B, nkv, capacity, hs), the last being its own; valid (B, S)
        bool, True where a position may be attended, or None for all -> (B, nh * hs)."""
        _, batch, n_kv_head, capacity, head_dim = kv.shape
        n_head = _query_heads(qkv, kv)
        _require(0 < length <= capacity, f"decode_attention: {length} positions in a cache of {capacity}")
        if valid is not None:
            is_mask = valid.dtype == torch.bool and valid.is_contiguous()
            _require(is_mask, "decode_attention: valid needs contiguous bool")
            _require(valid.shape[0] == batch and valid.shape[1] >= length, "decode_attention: valid (B, >= length)")
        out = qkv.new_empty(batch, n_head * head_dim)
        work = qkv.new_empty(batch, n_head, length)
        stride = 0 if valid is None else valid.shape[1]
        threads = _threads(2 * batch * n_kv_head * length * head_dim)  # keys and values read
        self._decode_attention(
            qkv.data_ptr(), qkv.shape[-1], kv.data_ptr(), _pointer(valid), stride, work.data_ptr(), out.data_ptr(),
            batch, n_head, n_kv_head, head_dim, capacity, length, threads,
        )  # fmt: skip
        return out


def _threads(elements: int) -> int:
    """PyTorch's thread count for work of this many floats; one thread for less than `THREADED_ELEMENTS`."""
    return torch.get_num_threads() if elements >= THREADED_ELEMENTS else 1


def _plain(*tensors: torch.Tensor) -> bool:
    """Whether the C loops can read these: float32, contiguous, in CPU memory."""
    for tensor in tensors:  # a loop, not all(...): this runs several times per layer of a decode step
        if tensor.dtype != torch.float32 or not tensor.is_cpu or not tensor.is_contiguous():
            return False
    return True


def _require(condition: bool, problem: str) -> None:
    """A wrong argument would make the C code read or write out of bounds: refuse it here instead."""
    if not condition:
        raise ValueError(f"native kernel: {problem}")


def _query_heads(qkv: torch.Tensor, kv: torch.Tensor) -> int:
    """nh for qkv (B, (nh + 2 nkv) hs) beside a cache kv (2, B, nkv, capacity, hs), after checking both."""
    _, batch, n_kv_head, _, head_dim = kv.shape
    shapes_fit = qkv.dim() == 2 and qkv.shape[0] == batch
    _require(_plain(qkv, kv) and shapes_fit, "qkv (B, width) and kv need contiguous float32")
    n_head = qkv.shape[1] // head_dim - 2 * n_kv_head
    fits = qkv.shape[1] % head_dim == 0 and head_dim % 2 == 0 and n_head > 0 and n_head % n_kv_head == 0
    _require(fits, "qkv's width does not fit the cache's heads")
    return n_head


def cpu_identity() -> str:
    """This CPU's model and feature flags: what `-march=native` compiles for. Where /proc/cpuinfo does
    not say (not Linux), the host's name stands in, so two hosts never share a build."""
    cpuinfo = Path("/proc/cpuinfo")
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        lines = []
    fields = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    wanted = sorted({line for line in lines if line.split(":")[0].strip() in fields})
    if not wanted:
        wanted = [platform.processor(), platform.node()]
    return platform.machine() + "\n" + "\n".join(wanted)


def compiler_version(compiler_path: str) -> str:
    """What `COMPILER --version` says ("" when it says nothing): an upgraded `cc` at the same path
    compiles differently, so it gets its own build."""
    try:
        done = subprocess.run([compiler_path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return done.stdout.strip()


def build(kernels_dir: Path, compiler: str) -> Kernels:
    """This machine's kernels from `kernels_dir`, compiled first when missing or damaged; loaded and checked."""
    library = cached_library(kernels_dir, compiler)
    try:
        kernels = Kernels(library)
    except (OSError, AttributeError) as error:  # not loadable here, or not our functions
        raise KernelUnavailable(f"cannot load {library}: {error}") from error
    _check(kernels)
    return kernels


def cached_library(kernels_dir: Path, compiler: str) -> Path:
    """The path of a verified build of `native.c` for this source, compiler and CPU in `kernels_dir`.

    The build's name hashes what it was built for; a record beside it (`.so.json`) states the same and
    the library's digest, written after the library. A library whose record is missing, unreadable, for
    something else, or whose bytes differ (truncated, zeroed, flipped) is compiled again: loading it
    could crash the process (SIGBUS, SIGSEGV, SIGILL) before any check could run."""
    try:
        source = SOURCE.read_bytes()
    except OSError as error:
        raise KernelUnavailable(f"cannot read the kernels' source {SOURCE}: {error.strerror or error}") from error
    compiler_path = shutil.which(compiler)
    if compiler_path is None:
        raise KernelUnavailable(f"no C compiler {compiler!r} on PATH (set CC to one)")
    source_hash = hashlib.sha256(source).hexdigest()
    built_for = "\n".join(
        [source_hash, compiler_path, compiler_version(compiler_path), " ".join(FLAGS), cpu_identity()]
    )
    library = kernels_dir / f"native-{hashlib.sha256(built_for.encode()).hexdigest()[:16]}.so"
    record = library.with_name(library.name + ".json")
    if _intact(library, record, built_for):
        return library
    try:
        with atomic_path(library) as tmp:
            _compile(compiler_path, tmp)
            digest = file_digest(tmp)  # of what this process built, whoever else renames theirs in meanwhile
        write_json(record, {"blake2b": digest, "built_for": built_for})
    except (OSError, AigcError) as error:
        raise KernelUnavailable(f"cannot write the kernels to {library.parent}: {error}") from error
    return library


def _intact(library: Path, record: Path, built_for: str) -> bool:
    """Whether `library` is the build its record describes, for `built_for`."""
    try:
        recorded = json.loads(record.read_text(encoding="utf-8"))
        return (
            isinstance(recorded, dict)
            and recorded.get("built_for") == built_for
            and recorded.get("blake2b") == file_digest(library)
        )
    except (OSError, ValueError):  # missing or unreadable: not known to be intact
        return False


def _compile(compiler_path: str, output: Path) -> None:
    command = [compiler_path, *FLAGS, str(SOURCE), "-o", str(output)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise KernelUnavailable(f"compiling {SOURCE.name} took over {BUILD_TIMEOUT_S} s") from error
    except OSError as error:  # not executable, or not a program
        raise KernelUnavailable(f"cannot run {compiler_path}: {error.strerror or error}") from error
    if done.returncode != 0:
        first_line = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise KernelUnavailable(f"{Path(compiler_path).name} failed on {SOURCE.name}: {first_line}")


def _check(kernels: Kernels) -> None:
    """Each kernel against PyTorch on small inputs with odd widths (the vector loops' tails)."""
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    weight, bias, x = randn(67, 45), randn(67), randn(MAX_ROWS, 45)
    checks = {"linear": (kernels.linear(x, weight, bias), F.linear(x, weight, bias))}
    checks["rms_norm"] = (kernels.rms_norm(x, bias[:45], 1e-5), F.rms_norm(x, (45,), bias[:45], 1e-5))
    h = 4 * randn(3, 2 * 37)
    checks["silu_mul"] = (kernels.silu_mul(h), F.silu(h[:, :37]) * h[:, 37:])
    # Two rows, 4 query heads sharing 2 cached heads of width 6; 3 positions, the first row's first masked.
    qkv, kv, angles = randn(2, 8 * 6), torch.zeros(2, 2, 2, 5, 6), randn(2, 6)
    kv[:, :, :, :2] = randn(2, 2, 2, 2, 6)
    valid = torch.tensor([[False, True, True], [True, True, True]])
    expected_q, expected_k = _rotated(qkv[:, :24], angles), _rotated(qkv[:, 24:36], angles)
    kernels.rope_append(qkv, (angles.cos(), angles.sin()), kv, at=2)
    checks["rope_append"] = (torch.cat((qkv[:, :24], kv[0, :, :, 2].flatten(1), kv[1, :, :, 2].flatten(1)), 1),
                             torch.cat((expected_q, expected_k, qkv[:, 36:]), 1))  # fmt: skip
    q, keys, values = qkv[:, :24].view(2, 4, 1, 6), kv[0, :, :, :3], kv[1, :, :, :3]
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=valid[:, None, None], enable_gqa=True)
    checks["decode_attention"] = (kernels.decode_attention(qkv, kv, valid, 3), expected.flatten(1))
    for name, (ours, theirs) in checks.items():
        if not torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4):
            raise KernelUnavailable(f"{kernels.library_path.name} computes {name} wrong on this machine")


def _rotated(heads: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Hugging Face Llama's rotation of (B, h * hs) heads by per-row angles (B, hs): `gpt.apply_rotary`'s
    formula, restated because gpt imports this module (tests/test_layers.py forbids the cycle)."""
    x = heads.view(heads.shape[0], -1, angles.shape[1])
    first, second = x.chunk(2, dim=-1)
    rotated = x * angles.cos()[:, None] + torch.cat((-second, first), -1) * angles.sin()[:, None]
    return rotated.flatten(1)


_unavailable_reason = ""


@functools.lru_cache(maxsize=1)
def kernels() -> Kernels | None:
    """The kernels for this process (built or loaded once), or None when they cannot be had here; then
    one warning on the `aigc.models.native` logger says why (unless AIGC_NATIVE_KERNELS=0 asked for it)."""
    global _unavailable_reason
    if os.environ.get("AIGC_NATIVE_KERNELS", "1") == "0":
        _unavailable_reason = "turned off by AIGC_NATIVE_KERNELS=0"
        return None
    try:
        return build(aigc_home() / "kernels", os.environ.get("CC") or "cc")
    except Exception as error:  # a speed-up that fails in any way must cost speed, not the text
        _unavailable_reason = str(error) if isinstance(error, KernelUnavailable) else f"{type(error).__name__}: {error}"
    log.warning("aigc: native CPU kernels unavailable (%s); using PyTorch's kernels instead", _unavailable_reason)
    return None


def unavailable_reason() -> str:
    """Why `kernels()` is None ("" when it is not, or has not been asked for yet)."""
    return _unavailable_reason


def for_inference(x: torch.Tensor) -> Kernels | None:
    """The kernels when `x` is float32 on the CPU with autograd and autocast off; None otherwise (and
    when they cannot be had), so callers keep to PyTorch for training, GPUs and other dtypes."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32:
        return None
    if torch.is_autocast_enabled("cpu"):
        return None
    return kernels()
