"""Why `aigc/models/native.c` has its own product: one SmolLM2-135M decode step's products, kernel against kernel.

The 121 products of one step (30 layers x q/k/v, attention output, gate/up, down; then the 49,152-row
output head) with random float32 weights, at 1 to 16 input rows, through:
  native  - `aigc.models.native` `linear` (the loop in native.c, compiled here with -O3 -march=native -fopenmp);
  oneDNN  - `torch.ops.mkldnn._linear_pointwise` on weights packed once (what `packed.Linear` uses);
  MKL     - plain `F.linear` (PyTorch's default for float32 on the CPU).
Also the memory's streaming speed: `torch.sum` over as many bytes as the weights. Best of `--repeats`,
the kernels interleaved in each round; GB/s counts each weight byte once.

    PYTHONPATH=src python benchmarks/bench_gemv.py [--rows 1 2 4 8 16] [--repeats 7] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from aigc.models import native
from aigc.models.packed import TUNED_ROWS

# (out, in) of one SmolLM2-135M decode step: fused q/k/v, attention output, fused gate/up, down; then the head.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def best_time(function, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    library = native.kernels()
    if library is None:
        raise SystemExit(f"the native kernels are unavailable here: {native.unavailable_reason()}")
    torch.manual_seed(0)
    weights = [torch.randn(n_out, n_in) for n_out, n_in in SHAPES]
    packed = [torch.ops.mkldnn._reorder_linear_weight(w, TUNED_ROWS) for w in weights]
    gigabytes = sum(w.numel() * 4 for w in weights) / 1e9
    stream = torch.randn(int(gigabytes * 1e9) // 4)
    print(f"{torch.get_num_threads()} threads; {len(SHAPES)} products, {gigabytes * 1e3:.0f} MB of weights")
    print(json.dumps({"torch.sum GB/s": round(gigabytes / best_time(stream.sum, args.repeats), 1)}))
    for rows in args.rows:
        inputs = [torch.randn(rows, n_in) for _, n_in in SHAPES]
        kernels = {
            "native": lambda inputs=inputs: [library.linear(x, w, None) for x, w in zip(inputs, weights)],
            "oneDNN": lambda inputs=inputs: [
                torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for x, p in zip(inputs, packed)
            ],
            "MKL": lambda inputs=inputs: [F.linear(x, w) for x, w in zip(inputs, weights)],
        }
        best = {name: float("inf") for name in kernels}
        for _ in range(args.repeats):  # interleaved: a busy spell on a shared machine hits all alike
            for name, function in kernels.items():
                best[name] = min(best[name], best_time(function, 1))
        figures = {"rows": rows}
        for name, seconds in best.items():
            figures[f"{name} ms"] = round(seconds * 1e3, 1)
            figures[f"{name} GB/s"] = round(gigabytes / seconds, 1)
        figures["native / oneDNN speed"] = round(best["oneDNN"] / best["native"], 2)
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
