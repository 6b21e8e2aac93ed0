"""Device and precision choice, shared by every stage that runs a model.

Precision. bf16 autocast only pays off where the hardware multiplies bf16 natively: CUDA GPUs with
bf16 support, and CPUs with AMX or AVX512-BF16. On an AVX2-only CPU a bf16 matmul is emulated and
~100x slower than fp32, so `--dtype auto` keeps fp32 there.
"""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

from aigc.errors import AigcError

# The CPU features that decide how fast training and inference run here (Linux /proc/cpuinfo names):
# 256/512-bit SIMD, int8 dot products, and native bf16 (AVX512-BF16, AMX).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
_TORCH_FLAG_NAMES = {"avx512f": "avx512_f"}  # where torch's capability report spells a flag otherwise


def cpu_capability() -> dict[str, Any]:
    """torch's report of this CPU's features and name ({} where torch has none)."""
    try:
        return dict(torch._C._cpu._get_cpu_capability())  # private, but the only complete report
    except (AttributeError, RuntimeError):
        return {}


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AMX or AVX512-BF16)."""
    features = cpu_capability()
    return bool(features.get("amx_bf16") or features.get("avx512_bf16"))


def cpu_name() -> str:
    """The CPU's model name: /proc/cpuinfo on Linux, else torch's report, else the platform's."""
    named = _proc_cpuinfo("model name")
    return named or cpu_capability().get("cpu_name") or platform.processor() or platform.machine() or "unknown CPU"


def _proc_cpuinfo(key: str) -> str | None:
    """The first value of `key` in /proc/cpuinfo (None off Linux, or where the key is absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.split(":", 1)[0].strip() == key), None)


def hardware(device: torch.device, dtype: str, processes: int = 1) -> dict[str, Any]:
    """Where a training session runs, as `config.json` records it (`extra.hardware`) and the report shows it."""
    features = cpu_capability()
    info: dict[str, Any] = {
        "cpu": cpu_name(),
        "cpu_flags": [flag for flag in CPU_FLAGS if features.get(_TORCH_FLAG_NAMES.get(flag, flag))],
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "device": str(device),
        "dtype": dtype,
        "processes": processes,
        "torch": torch.__version__,
    }
    if device.type == "cuda":
        info["accelerator"] = torch.cuda.get_device_name(device)
    return info


def describe_hardware(info: dict[str, Any]) -> str:
    """One line of `hardware()`'s record, e.g. "Intel Xeon (avx2, avx512f), 2 threads of 2 cores; device cpu, fp32"."""
    flags = f" ({', '.join(info['cpu_flags'])})" if info.get("cpu_flags") else ""
    device = info.get("device", "?") + (f" {info['accelerator']}" if info.get("accelerator") else "")
    processes = f" x {info['processes']} processes" if (info.get("processes") or 1) > 1 else ""
    threads = f"{info.get('threads', '?')} thread{'' if info.get('threads') == 1 else 's'}"
    return (
        f"{info.get('cpu', 'unknown CPU')}{flags}, {threads} of {info.get('cores', '?')} cores{processes}; "
        f"device {device}, {info.get('dtype', '?')}; torch {info.get('torch', '?')}"
    )


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
