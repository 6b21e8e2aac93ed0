"""`--dtype auto` for training: the precision that trains fastest on this machine, and why.

On a CPU that claims native bf16 (AMX or AVX512-BF16), bf16 products alone do not decide it: on an
AVX512-BF16 CPU without AMX a bf16 LoRA step was 3.8x slower than fp32 (docs/benchmarks.md), the
elementwise work and casts around the products costing more than the products gained. So the probe
times what training runs: a few LoRA steps of a two-block model of SmolLM2's width in fp32 and in bf16
(the frozen base held in bf16, as `Trainer` does), alternating, once per CPU, torch version and thread
count, and keeps the figures in `$AIGC_HOME/probes/precision.json` (like the compiled kernels).
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from aigc.artifacts.device import cpu_has_fast_bf16, pick_dtype
from aigc.artifacts.run import aigc_home
from aigc.config import LLAMA_STYLE, ModelConfig
from aigc.fsutil import write_json
from aigc.models import build_model
from aigc.models.lora import LoRASpec, apply_lora, hold_frozen_in

# bf16 must train at least this much faster than fp32 to be worth its rounding.
BF16_MIN_SPEEDUP = 1.2
PROBE_VERSION = 1  # bumped when the probe changes, so older cached figures are measured again
# Two blocks of SmolLM2-135M's shape, a 4,096-token vocabulary, batch 4 x 128 (the fine-tuning default).
PROBE_MODEL = ModelConfig(
    n_layer=2, n_head=9, n_kv_head=3, n_embd=576, ffn_hidden=1536, vocab_size=4096, block_size=128, **LLAMA_STYLE
)


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
    return PrecisionChoice(
        "bf16" if ratio >= BF16_MIN_SPEEDUP else "fp32",
        f"a probe LoRA step ran {ratio:.1f}x as fast in bf16 as in fp32 on this CPU ({rates['fp32']:.0f} and "
        f"{rates['bf16']:.0f} tokens/s, {rates['threads']} threads; cached in {probe_path()})",
    )


def probe_path() -> Path:
    return aigc_home() / "probes" / "precision.json"


def cached_probe() -> dict:
    """Tokens/s of the probe in fp32 and bf16: measured once per CPU, torch and thread count (a few
    seconds), then read from `probe_path()`."""
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


def probe_rates(rounds: int = 3) -> dict[str, float]:
    """Best tokens/s of a LoRA step of `PROBE_MODEL` in each precision; the rounds alternate between
    them so that a busy spell on a shared machine hits both."""
    with torch.random.fork_rng(devices=[]):  # the caller's seed must not depend on whether we probed
        torch.manual_seed(0)
        steps = {name: _probe_step(name) for name in ("fp32", "bf16")}
        x = torch.randint(0, PROBE_MODEL.vocab_size, (4, PROBE_MODEL.block_size + 1))  # (B, T + 1)
        best = dict.fromkeys(steps, float("inf"))
        for step in steps.values():  # first call: allocations, oneDNN kernel choice
            step(x)
        for _ in range(rounds):
            for name, step in steps.items():
                started = time.perf_counter()
                step(x)
                best[name] = min(best[name], time.perf_counter() - started)
    return {name: 4 * PROBE_MODEL.block_size / seconds for name, seconds in best.items()}


def _probe_step(dtype: str):
    model = build_model(PROBE_MODEL).train()
    apply_lora(model, LoRASpec(rank=16, alpha=32.0, targets=("c_attn", "c_proj", "c_fc")))
    if dtype == "bf16":
        hold_frozen_in(model, torch.bfloat16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    def step(x: torch.Tensor) -> None:
        with autocast:
            loss = model(x[:, :-1], x[:, 1:], return_logits=False)[1]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return ""
