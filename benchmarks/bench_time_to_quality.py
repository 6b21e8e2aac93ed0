"""Time to quality: training wall time until the validation loss first reaches a fixed value, aigc's
LoRA against peft's, from the same start.

Both start from the same SmolLM2-135M weights (`aigc pull smollm2-135m`), get the same LoRA (r16,
alpha 32, every block linear; built as in bench_lora.py), the same AdamW (lr 1e-3 after 10 warm-up
steps, fused) and the same batches: windows of the IMDb reviews prepared for the demo
(`data/imdb-smol`, the base's tokenizer), drawn by one seeded sampler, with the two control tokens
(ids past the base's vocabulary, which the peft model lacks) replaced by the end-of-text token for
both. Every `--eval-every` steps each computes the loss over the same fixed validation windows; only
the training steps are timed. The target is `--target`, by default the base's validation loss minus
0.10 (printed). Each contender runs at its own fastest dtype on the host (bf16 where it is fast).

    python benchmarks/bench_time_to_quality.py [--data data/imdb-smol] [--max-steps 200] [--target 3.8]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from aigc.artifacts.dataset import open_dataset
from aigc.artifacts.device import cpu_has_fast_bf16
from aigc.train.batches import BatchSampler, fixed_windows
from aigc.train.runtime import auto_threads
from bench_lora import cpu_flags, ours, theirs

CPU = torch.device("cpu")
WARMUP = 10


def batches(data: Path, vocab: int, eot: int, args) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The training batches (each (B, T + 1)) and the validation windows (N, T + 1), control tokens
    replaced by `eot` so that both models can read them."""
    dataset = open_dataset(data)
    sampler = BatchSampler(dataset.train.tokens, args.seq, args.batch, seed=args.seed)
    train = []
    for _ in range(args.max_steps):
        inputs, targets = sampler.next(CPU)
        train.append(torch.cat((inputs, targets[:, -1:]), dim=1))
    sampler.close()
    starts = fixed_windows(dataset.val.tokens, args.seq, args.val_windows)
    val = torch.from_numpy(np.stack([np.asarray(dataset.val.tokens[s : s + args.seq + 1], np.int64) for s in starts]))
    return [b.masked_fill(b >= vocab, eot) for b in train], val.masked_fill(val >= vocab, eot)


class Contender:
    """One model in the race: its optimizer, its clock (training steps only) and its validation curve."""

    def __init__(self, name: str, model, loss_fn, dtype: str):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, fused=True)
        self.autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
        self.seconds, self.curve, self.reached_at = 0.0, [], None

    def step(self, step: int, batch: torch.Tensor) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, step / WARMUP)
        started = time.perf_counter()
        with self.autocast:
            loss = self.loss_fn(self.model, batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.seconds += time.perf_counter() - started

    def evaluate(self, step: int, val: torch.Tensor, target: float) -> None:
        loss = validation_loss(self.model, self.loss_fn, val, self.autocast)
        self.curve.append((step, round(self.seconds, 2), round(loss, 4)))
        print(f"  {self.name}: step {step}, {self.seconds:.1f} s, val loss {loss:.4f}", flush=True)
        if loss <= target and self.reached_at is None:
            self.reached_at = (step, self.seconds)


def race(contenders: list[Contender], train, val, target: float, eval_every: int) -> None:
    """Step by step, alternating (a busy spell on a shared machine hits both alike), until each has
    reached `target` or the batches run out."""
    for step, batch in enumerate(train, start=1):
        running = [c for c in contenders if c.reached_at is None]
        if not running:
            return
        for contender in running:
            contender.step(step, batch)
            if step % eval_every == 0:
                contender.evaluate(step, val, target)


@torch.no_grad()
def validation_loss(model, loss_fn, val: torch.Tensor, autocast) -> float:
    model.eval()
    with autocast:
        losses = [float(loss_fn(model, val[i : i + 8])) for i in range(0, len(val), 8)]
    model.train()
    return sum(losses) / len(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="smollm2-135m", help="the base: a run folder or pulled model name")
    parser.add_argument("--data", type=Path, default=Path("data/imdb-smol"), help="prepared with the base's tokenizer")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--val-windows", type=int, default=32)
    parser.add_argument("--target", type=float, default=None, help="validation loss to reach (default: base - 0.10)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or auto_threads())
    dtype = "bf16" if cpu_has_fast_bf16() else "fp32"
    torch.manual_seed(args.seed)
    model, loss_fn = ours(args.run, args.rank, dtype)
    vocab = model.wte.num_embeddings
    train, val = batches(args.data, vocab, open_dataset(args.data).tokenizer.eot_id, args)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    base = validation_loss(model, loss_fn, val, autocast)
    target = args.target if args.target is not None else round(base - 0.10, 3)
    print(f"host: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {dtype}")
    print(f"batch {args.batch} x {args.seq}, LoRA r{args.rank}; base val loss {base:.4f}, target {target:.3f}")
    aigc = Contender("aigc", model, loss_fn, dtype)
    torch.manual_seed(args.seed)
    peft = Contender("peft", *theirs(args.run, args.rank, dtype), dtype)
    race([aigc, peft], train, val, target, args.eval_every)
    for c in (aigc, peft):
        when = (
            f"{c.reached_at[1]:.1f} s ({c.reached_at[0]} steps)"
            if c.reached_at
            else f"not within {args.max_steps} steps"
        )
        print(f"  {c.name:5s} reached {target:.3f} in {when}")
    if aigc.reached_at and peft.reached_at:
        print(f"  time to quality, peft / aigc: {peft.reached_at[1] / aigc.reached_at[1]:.2f}x")
    if args.json:
        runs = {c.name: {"reached_at": c.reached_at, "curve": c.curve} for c in (aigc, peft)}
        out = {"host": cpu_flags(), "dtype": dtype, "base_val_loss": base, "target": target, "runs": runs}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
