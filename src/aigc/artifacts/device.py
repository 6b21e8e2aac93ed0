"""Device and precision choice, shared by every stage that runs a model.

Precision. bf16 autocast only pays off where the hardware multiplies bf16 natively: CUDA GPUs with
bf16 support, and CPUs with AMX or AVX512-BF16. On an AVX2-only CPU a bf16 matmul is emulated and
~100x slower than fp32, so `--dtype auto` keeps fp32 there.
"""

from __future__ import annotations

import functools

import torch

from aigc.artifacts.hardware import cpu_capability
from aigc.errors import AigcError


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AMX or AVX512-BF16)."""
    features = cpu_capability()
    return bool(features.get("amx_bf16") or features.get("avx512_bf16"))


@functools.cache  # asked at every prefill product; the CPU does not change
def cpu_has_amx_bf16() -> bool:
    """True on CPUs with AMX bf16 tiles, where PyTorch's bf16 matrix products run several times fp32's
    (2,653 against 349 GFLOP/s for a 512 x 896 x 4,864 product, 2-core Xeon, docs/benchmarks.md)."""
    return bool(cpu_capability().get("amx_bf16"))


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` picks cuda > mps > cpu; an explicit device that is absent is a user error."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name == "cuda" and not cuda:
        raise AigcError("--device cuda was asked for but no CUDA GPU is visible; use --device auto or cpu")
    if name == "mps" and not mps:
        raise AigcError("--device mps was asked for but Apple MPS is not available; use --device auto or cpu")
    if name == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_fast_bf16() else "fp32"
    return "fp32"
