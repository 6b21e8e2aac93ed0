"""LoRA on a block-quantised base (QLoRA) against the fp32 base: the frozen product's options, and
`aigc train` itself.

`layers`: one forward + input-gradient backward of each SmolLM2-135M layer shape (Q4_0 blocks, a
batch of 4 x 128 rows), the ways a frozen quantised layer can do it, interleaved, best of the rounds:
  dense fp32 / dense bf16   the float layer (what an fp32 base does, held in bf16 under bf16 training)
  expand bf16 / expand fp32 `qgrad.frozen_product`: the blocks expanded in the compute dtype in the
                            forward pass and again in the backward pass, one GEMM each
  kernel fp32               the forward through the native kernels' tiled path (`QuantLinear._tiled`:
                            float32 tiles and GEMM), the backward expanded as above

`train`: `aigc train --init-from BASE --lora-rank 16 --max-steps N` on each base in turn, the same data,
seed and options, each under `/usr/bin/time -v`: tokens/s of the training steps (metrics.jsonl), peak
RSS, and the training and validation loss after the same steps.

    python benchmarks/bench_qlora.py layers [--rounds 5]
    python benchmarks/bench_qlora.py train --fp32 smollm2-135m --quant /tmp/smol-q4 --data DATA [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from aigc.models import quant
from aigc.models.qlayers import Part, QuantLinear

# (out, in) of SmolLM2-135M's layers: c_attn (q, k, v), attn c_proj, c_fc (gate, up), mlp c_proj, output
SHAPES = {"c_attn": (960, 576), "attn.c_proj": (576, 576), "c_fc": (3072, 576), "mlp.c_proj": (576, 1536)}
SHAPES["lm_head"] = (49152, 576)


class _KernelForward(torch.autograd.Function):
    """The alternative: forward through the native kernels (float32 only), backward expanded."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return layer._tiled(quant.kernels(), x.contiguous())

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.layer.dequantized(torch.float32), None


def layer_variants(out: int, n_in: int, rows: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    layer = QuantLinear([Part("Q4_0", quant.random_blocks("Q4_0", out, n_in, generator), out, n_in)], None)
    weight = layer.dequantized()
    weight_bf16 = weight.to(torch.bfloat16)
    x = torch.randn(rows, n_in)

    def run(product, dtype):
        def step():
            inputs = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                y = product(inputs)
            y.backward(torch.ones_like(y))

        return step

    return {
        "dense fp32": run(lambda v: F.linear(v, weight), torch.float32),
        "dense bf16": run(lambda v: F.linear(v.to(torch.bfloat16), weight_bf16), torch.bfloat16),
        "expand fp32": run(layer, torch.float32),
        "expand bf16": run(layer, torch.bfloat16),
        "kernel fp32": run(lambda v: _KernelForward.apply(v, layer), torch.float32),
    }


def bench_layers(args) -> None:
    assert quant.kernels() is not None, quant.unavailable_reason()
    print(f"threads {torch.get_num_threads()}, rows {args.rows}, Q4_0, best of {args.rounds} rounds (ms)")
    names = ["dense fp32", "dense bf16", "expand fp32", "expand bf16", "kernel fp32"]
    print(f"{'layer':12s} " + " ".join(f"{n:>12s}" for n in names))
    totals = dict.fromkeys(names, 0.0)
    for label, (out, n_in) in SHAPES.items():
        steps = layer_variants(out, n_in, args.rows)
        best = dict.fromkeys(steps, float("inf"))
        for step in steps.values():
            step()
        for _ in range(args.rounds):
            for name, step in steps.items():
                started = time.perf_counter()
                step()
                best[name] = min(best[name], time.perf_counter() - started)
        count = 30 if label != "lm_head" else 1  # SmolLM2-135M: 30 blocks, one output layer
        for name in names:
            totals[name] += count * best[name]
        print(f"{label:12s} " + " ".join(f"{1e3 * best[n]:12.2f}" for n in names))
    print(f"{'model':12s} " + " ".join(f"{1e3 * totals[n]:12.1f}" for n in names))


def train_once(base: str, args, out: Path) -> dict:
    command = [sys.executable, "-m", "aigc", "train", "--init-from", base, "--data", args.data, "--out", str(out)]
    command += ["--lora-rank", "16", "--max-steps", str(args.steps), "--eval-every", str(args.steps)]
    command += ["--eval-batches", "4", "--batch-size", "4", "--seq-len", "128", "--sample-tokens", "0"]
    command += ["--seed", "1337", "--dtype", args.dtype, "--threads", str(args.threads), "--quiet", "--overwrite"]
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{base}: aigc train failed:\n{done.stderr[-2000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", done.stderr).group(1)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {
        "tokens_per_s": last["tokens_per_s"],
        "peak_rss_gb": rss_kb * 1024 / 1e9,
        "wall": wall,
        "train_loss": last["train_loss"],
        "val_loss": last["val_loss"],
        "stored_mb": (out / "model.safetensors").stat().st_size / 1e6,
    }


def bench_train(args) -> None:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        bases = [("fp32", args.fp32), ("quantised", args.quant)][1 if args.quantised_only else 0 :]
        for name, base in bases:
            results[name] = train_once(base, args, Path(tmp) / name)
            row = results[name]
            print(
                f"{name:10s} {row['tokens_per_s']:7.1f} tokens/s  peak RSS {row['peak_rss_gb']:.2f} GB  "
                f"wall {row['wall']}  train loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
                f"stored {row['stored_mb']:.1f} MB",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    layers = sub.add_parser("layers", help="the frozen product's options, per SmolLM2-135M layer shape")
    layers.add_argument("--rows", type=int, default=512, help="rows of x (batch x sequence)")
    layers.add_argument("--rounds", type=int, default=5)
    layers.add_argument("--threads", type=int, default=0, help="0: torch's default")
    train = sub.add_parser("train", help="aigc train on the fp32 and the quantised base, under /usr/bin/time -v")
    train.add_argument("--fp32", default="smollm2-135m", help="the fp32 base (run folder or pulled name)")
    train.add_argument("--quant", required=True, help="the same model exported with aigc export --format q4")
    train.add_argument("--data", required=True, help="a dataset prepared with the base's tokenizer")
    train.add_argument("--steps", type=int, default=30)
    train.add_argument("--dtype", default="auto")
    train.add_argument("--threads", type=int, default=0)
    train.add_argument("--json", help="also write the figures here")
    train.add_argument("--quantised-only", action="store_true", help="train on the quantised base only")
    args = parser.parse_args()
    if args.what == "layers":
        if args.threads:
            torch.set_num_threads(args.threads)
        bench_layers(args)
    else:
        bench_train(args)


if __name__ == "__main__":
    main()
