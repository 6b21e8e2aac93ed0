"""What a training session runs on, recorded in the run's `config.json` (`extra.hardware`) and shown
in its report: the CPU's model and the features that decide its speed, threads, device and precision."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch

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
    """Where a training session runs, as `config.json` records it (`extra.hardware`)."""
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
