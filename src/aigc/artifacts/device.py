"""Device and precision choice, shared by every stage that runs a model.

Precision. bf16 autocast only pays off where the hardware multiplies bf16 natively: CUDA GPUs with
bf16 support, and CPUs with AMX or AVX512-BF16. On an AVX2-only CPU a bf16 matmul is emulated and
~100x slower than fp32, so `--dtype auto` keeps fp32 there. For training on a CPU that claims native
bf16, `choose_training_dtype` also times both precisions once (a short probe of a training-sized
product, cached in $AIGC_HOME/probes) and picks bf16 only where it is clearly faster.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass

import torch

from aigc.artifacts.run import aigc_home
from aigc.errors import AigcError
from aigc.fsutil import write_json

# bf16 must multiply at least this much faster than fp32 to be worth its rounding: on a 2-core Xeon with
# AMX it was 6x (1,870 against 307 GFLOP/s), on CPUs that emulate it 0.01x.
BF16_MIN_SPEEDUP = 1.3
PROBE_VERSION = 1  # bumped when the probe changes, so older cached figures are measured again


def cpu_has_fast_bf16() -> bool:
    """True on CPUs with native bf16 matmul (AMX or AVX512-BF16)."""
    try:
        features = torch._C._cpu._get_cpu_capability()  # private, but the only complete report
    except (AttributeError, RuntimeError):
        return False
    return bool(features.get("amx_bf16") or features.get("avx512_bf16"))


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


@dataclass(frozen=True)
class PrecisionChoice:
    """The training precision and why (recorded in the run's config.json under `extra.precision`)."""

    dtype: str  # "fp32" or "bf16"
    reason: str

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "reason": self.reason}


def choose_training_dtype(name: str, device: torch.device) -> PrecisionChoice:
    """`--dtype` for training: an explicit choice is kept; `auto` picks what trains fastest here."""
    if name != "auto":
        return PrecisionChoice(name, f"--dtype {name}")
    if device.type != "cpu":
        dtype = pick_dtype(name, device)
        return PrecisionChoice(dtype, f"{device.type}: bf16 {'supported' if dtype == 'bf16' else 'not supported'}")
    if not cpu_has_fast_bf16():
        return PrecisionChoice("fp32", "this CPU has no native bf16 products (neither AMX nor AVX512-BF16)")
    rates = cached_probe()
    ratio = rates["bf16"] / rates["fp32"]
    faster = ratio >= BF16_MIN_SPEEDUP
    return PrecisionChoice(
        "bf16" if faster else "fp32",
        f"bf16 products ran {ratio:.1f}x fp32's on this CPU ({rates['fp32']:.0f} against {rates['bf16']:.0f} "
        f"GFLOP/s, {rates['threads']} threads; the probe is cached in {probe_path()})",
    )


def probe_path():
    return aigc_home() / "probes" / "precision.json"


def cached_probe() -> dict:
    """GFLOP/s of a training-sized product in fp32 and bf16, measured once per CPU, torch and thread
    count (about a second) and kept in `probe_path()`."""
    key = f"v{PROBE_VERSION} {platform.machine()} {_cpu_model()} torch {torch.__version__}"
    key += f" threads {torch.get_num_threads()}"
    path = probe_path()
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = {}
    if key not in saved:
        saved[key] = {**probe_rates(), "threads": torch.get_num_threads()}
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, saved)
    return saved[key]


def probe_rates(rounds: int = 4) -> dict[str, float]:
    """Best GFLOP/s of (512 x 576) @ (576 x 1536), SmolLM2's MLP product at batch 4 x 128, in each
    dtype; rounds alternate between them so that a busy spell on a shared machine hits both."""
    shapes = {name: (torch.randn(512, 576).to(d), torch.randn(576, 1536).to(d)) for name, d in _DTYPES.items()}
    best = dict.fromkeys(shapes, float("inf"))
    for _ in range(rounds):
        for name, (a, b) in shapes.items():
            a @ b  # first call: oneDNN picks its kernel
            started = time.perf_counter()
            for _ in range(5):
                a @ b
            best[name] = min(best[name], (time.perf_counter() - started) / 5)
    return {name: 2 * 512 * 576 * 1536 / seconds / 1e9 for name, seconds in best.items()}


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""
