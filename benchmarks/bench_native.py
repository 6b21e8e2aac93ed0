"""Why `aigc/models/native.c` fuses a decode step's elementwise work: each kernel against the PyTorch ops
it replaces, then whole SmolLM2-135M decode steps with and without the kernels.

Per kernel, at SmolLM2-135M's shapes for one decode step of `--batch` rows (width 576, 9 query heads
sharing 3 cached heads of 64, hidden 1536, `--length` cached positions), median microseconds per call:
  rms_norm          - `F.rms_norm` (what `nn.RMSNorm` runs)
  silu_mul          - chunk, `F.silu`, multiply (the model's SwiGLU)
  rope_append       - the model's `apply_rotary` on queries and keys, then the two cache writes
  decode_attention  - `F.scaled_dot_product_attention` over the cache with `enable_gqa`
Then the model: `--steps` greedy one-token steps after a prefill, milliseconds per step, with the
kernels and with `native.kernels` switched off (PyTorch and oneDNN only), interleaved rounds, best of
`--repeats`. Both must pick the same tokens.

    AIGC_HOME=/tmp/aigc_home python benchmarks/bench_native.py [--batch 1 16] [--length 80] [--steps 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from aigc.models import load_run, native
from aigc.models.gpt import apply_rotary

WIDTH, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 576, 9, 3, 64, 1536


def median_us(function, calls: int = 300) -> float:
    function()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def kernel_pairs(library: native.Kernels, batch: int, length: int) -> dict:
    """name -> (PyTorch's way, the native call), on random inputs of one decode step's shapes."""
    x, weight = torch.randn(batch, 1, WIDTH), torch.randn(WIDTH)
    h = torch.randn(batch, 1, 2 * HIDDEN)
    qkv = torch.randn(batch, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
    kv = torch.randn(2, batch, KV_HEADS, 256, HEAD_DIM)
    angles = torch.randn(batch, 1, 1, HEAD_DIM)
    cos, sin = angles.cos(), angles.sin()

    def torch_silu_mul():
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def torch_rope_append():
        heads = qkv.view(batch, 1, HEADS + 2 * KV_HEADS, HEAD_DIM).transpose(1, 2)  # (B, h, 1, hs)
        qk = apply_rotary(heads[:, : HEADS + KV_HEADS], cos, sin)
        kv[0, :, :, length - 1 : length], kv[1, :, :, length - 1 : length] = qk[:, HEADS:], heads[:, HEADS + KV_HEADS :]
        return qk[:, :HEADS]

    def torch_attention():
        q = qkv[:, : HEADS * HEAD_DIM].view(batch, HEADS, 1, HEAD_DIM)
        keys, values = kv[0, :, :, :length], kv[1, :, :, :length]
        return F.scaled_dot_product_attention(q, keys, values, enable_gqa=True)

    return {
        "rms_norm": (lambda: F.rms_norm(x, (WIDTH,), weight, 1e-5), lambda: library.rms_norm(x, weight, 1e-5)),
        "silu_mul": (torch_silu_mul, lambda: library.silu_mul(h)),
        "rope_append": (torch_rope_append, lambda: library.rope_append(qkv.clone(), (cos, sin), kv, length - 1)),
        "decode_attention": (torch_attention, lambda: library.decode_attention(qkv, kv, None, length)),
    }


def decode_steps(model, batch: int, steps: int) -> tuple[float, list]:
    """Seconds per greedy one-token step after a 16-token prefill, and the tokens picked."""
    idx = torch.randint(0, model.config.vocab_size, (batch, 16), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(batch)
    token = model(idx, cache=cache, last_only=True)[0][:, -1].argmax(-1, keepdim=True)
    picked, start = [], time.perf_counter()
    for _ in range(steps):
        token = model(token, cache=cache)[0][:, -1].argmax(-1, keepdim=True)
        picked.append(token)
    return (time.perf_counter() - start) / steps, torch.cat(picked, 1).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="smollm2-135m", help="a pulled name or run folder (Llama-style)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--length", type=int, default=80, help="cached positions the attention reads")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    library = native.kernels()
    if library is None:
        raise SystemExit(f"the native kernels are unavailable here: {native.unavailable_reason()}")
    print(f"{torch.get_num_threads()} threads; {args.length} cached positions")
    model = load_run(args.run).model.eval()  # outside inference mode, as `aigc generate` loads it
    with torch.inference_mode():
        for batch in args.batch:
            row = {"batch": batch}
            for name, (theirs, ours) in kernel_pairs(library, batch, args.length).items():
                row[f"{name} torch us"] = round(median_us(theirs), 1)
                row[f"{name} native us"] = round(median_us(ours), 1)
            print(json.dumps(row), flush=True)
        switch = {"native": lambda: library, "PyTorch": lambda: None}
        for batch in args.batch:
            best, tokens = dict.fromkeys(switch, float("inf")), {}
            for _ in range(args.repeats):  # interleaved: a busy spell on a shared machine hits both alike
                for name, kernels in switch.items():
                    native.kernels = kernels
                    seconds, tokens[name] = decode_steps(model, batch, args.steps)
                    best[name] = min(best[name], seconds)
            row = {"batch": batch, **{f"{name} ms/step": round(s * 1e3, 1) for name, s in best.items()}}
            row["speed-up"] = round(best["PyTorch"] / best["native"], 2)
            row["same tokens"] = tokens["native"] == tokens["PyTorch"]
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
