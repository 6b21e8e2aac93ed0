"""One quantised layer product, float32 kernels (blocks expanded in registers) against integer kernels
(8-bit activations, `qdot.c`), with F.linear on the expanded fp32 weights for scale.

For each type, an (--out x --in) layer of random blocks and --rows input rows; the three products are
timed in turn in each of --repeats rounds (so a burst of load on a shared machine hits all of them) and
the best time of each is printed in ms, with the weight bytes read per second of the integer kernel.

    PYTHONPATH=src python benchmarks/bench_qdot.py [--rows 1 16] [--threads 1] [--repeats 15] [--types Q4_1 ...]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from aigc.models import quant
from aigc.models.qblocks import QUANTISED, dequantize
from bench_forward import best_times


def best_ms(functions: dict, repeats: int) -> dict:
    """Best milliseconds of each function over interleaved rounds (`bench_forward.best_times`)."""
    best, _ = best_times(functions, repeats)
    return {name: 1e3 * seconds for name, seconds in best.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=int, default=1536)
    parser.add_argument("--in", dest="n_in", type=int, default=1536)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--types", nargs="+", default=list(QUANTISED))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = quant.kernels()
    if kernels is None or not kernels.dot:
        raise SystemExit(f"no integer kernels here: {quant.unavailable_reason() or 'the build has no AVX2'}")
    print(f"{kernels.isa} build, integer dot {kernels.dot}, {args.threads} thread(s), {args.out} x {args.n_in}")
    generator = torch.Generator().manual_seed(0)
    for type_name in args.types:
        blocks = quant.random_blocks(type_name, args.out, args.n_in, generator)
        weight = dequantize(blocks, type_name, args.n_in)
        for rows in args.rows:
            x = torch.randn(rows, args.n_in, generator=generator)
            with torch.no_grad():
                times = best_ms(products(kernels, blocks, type_name, weight, x), args.repeats)
            kernels.integer = True
            gbs = blocks.numel() / times["integer"] / 1e6
            row = {"type": type_name, "rows": rows, **{k: round(v, 3) for k, v in times.items()}}
            print(json.dumps({**row, "integer GB/s of blocks": round(gbs, 1)}))


def products(kernels: quant.QuantKernels, blocks, type_name: str, weight, x) -> dict:
    out = torch.empty(x.shape[0], blocks.shape[0])

    def product(integer: bool) -> None:
        kernels.integer = integer
        kernels.gemv(blocks, type_name, x, out, 0)

    return {
        "float": lambda: product(False),
        "integer": lambda: product(True),
        "F.linear fp32": lambda: F.linear(x, weight),
    }


if __name__ == "__main__":
    main()
