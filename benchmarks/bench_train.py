"""Training speed of the `small` preset: tokens/s and model FLOPs utilisation (MFU), measured side by side.

Variants, all on the same model shape and batch:
  plain    fp32 eager, per-tensor AdamW loop, torch's default threads (every core): the naive loop
  fused    plain + the fused AdamW kernel (still every core)
  aigc     what `aigc train` does here: fused AdamW, fp32 (`--dtype auto` on an AVX2 CPU), and
           `--threads 0` (auto: the cores other work leaves free; the plain loop uses all cores)
  compile  aigc + torch.compile
  bf16     aigc + bf16 autocast (measured on a reduced batch: emulated bf16 is very slow here)
MFU = achieved model FLOP/s (6N + attention, `flops_per_token`) / measured matmul peak of this machine.
The variants run in alternating rounds so that load from other processes hits them alike.

    .venv/bin/python benchmarks/bench_train.py [--rounds 3] [--steps 3] [--vocab 8192] [--no-compile]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

import torch

from aigc.config import TrainConfig, model_preset, train_preset
from aigc.models import build_model
from aigc.train.optim import build_optimizer
from aigc.train.runtime import auto_threads, cpu_has_fast_bf16


def matmul_peak(dtype: torch.dtype, size: int = 1024, seconds: float = 1.0) -> float:
    """FLOP/s of a square matmul in `dtype`."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start)


class Variant:
    all_cores = torch.get_num_threads()
    auto = auto_threads()  # decided once, before we load the machine ourselves (as `aigc train` does)

    def __init__(self, name: str, config, batch: int, *, plain=False, all_cores=False, compile=False, bf16=False):
        torch.manual_seed(0)
        self.name, self.batch, self.bf16 = name, batch, bf16
        self.threads = self.all_cores if all_cores else self.auto
        self.model = build_model(config).train()
        if plain:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, foreach=False)
        else:
            self.optimizer = build_optimizer(self.model, TrainConfig(), torch.device("cpu"))
        self.forward = torch.compile(self.model) if compile else self.model
        self.inputs = torch.randint(0, config.vocab_size, (batch, config.block_size + 1))
        self.seconds, self.tokens = 0.0, 0

    def step(self) -> None:
        x, y = self.inputs[:, :-1], self.inputs[:, 1:]
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        # The plain loop keeps torch's default (every core); aigc picks the free ones.
        torch.set_num_threads(self.threads)
        start = time.perf_counter()
        with autocast:
            _, loss = self.forward(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()
        self.seconds += time.perf_counter() - start
        self.tokens += x.numel()

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--batch", type=int, default=train_preset("small").batch_size)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    config = model_preset("small", vocab_size=args.vocab)
    flops = build_model(config).flops_per_token()
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16, size=256)
    print(
        f"machine: {torch.get_num_threads()} threads (auto: {Variant.auto}, load "
        f"{os.getloadavg()[0]:.1f}), fast bf16: {cpu_has_fast_bf16()}, "
        f"matmul peak fp32 {peak32 / 1e9:.1f} GFLOP/s, bf16 {peak16 / 1e9:.2f} GFLOP/s"
    )
    print(
        f"model: small ({config.n_layer}x{config.n_embd}, context {config.block_size}, vocab {args.vocab}), "
        f"batch {args.batch}, {flops / 1e6:.1f} MFLOP per token (train)"
    )
    variants = [
        Variant("plain", config, args.batch, plain=True, all_cores=True),
        Variant("fused", config, args.batch, all_cores=True),
        Variant("aigc", config, args.batch),
    ]
    if not args.no_compile:
        variants.append(Variant("compile", config, args.batch, compile=True))
    bf16 = Variant("bf16", config, 1 if not cpu_has_fast_bf16() else args.batch, bf16=True)
    for v in variants + [bf16]:  # warm-up (and compilation), untimed
        v.step()
        v.seconds, v.tokens = 0.0, 0
    for _ in range(args.rounds):
        for v in variants:
            for _ in range(args.steps):
                v.step()
    bf16.step()
    base = variants[0].tokens_per_s
    print(
        f"{'variant':8} {'threads':>7} {'batch':>5} {'tokens/s':>9} {'vs plain':>8} {'MFU':>6}  (of the "
        "matmul peak in its dtype)"
    )
    for v in variants + [bf16]:
        mfu = v.tokens_per_s * flops / (peak16 if v.bf16 else peak32)
        print(f"{v.name:8} {v.threads:7d} {v.batch:5d} {v.tokens_per_s:9.0f} {v.tokens_per_s / base:7.2f}x {mfu:6.1%}")


if __name__ == "__main__":
    main()
