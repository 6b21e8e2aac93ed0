"""fp32 vs int8 (dynamic, per-channel) vs bf16 on CPU, side by side in one run.

For one trained run and its prepared dataset, measures per precision:
- file size of the weights (fp32: the run's model.safetensors; int8: `aigc export --format int8`;
  bf16: the same weights cast and saved as safetensors),
- generation speed with the shared decode loop (greedy, a fixed number of new tokens, batch 1 and 8),
- validation bits per byte and next-token accuracy on the first N validation documents.

    python benchmarks/bench_int8.py --run RUN --data DATA [--docs 0] [--new-tokens 128] [--threads 1]

On a busy machine, more threads than free cores make every parallel kernel wait for the scheduler
(measured here: 20 int8 tokens took 15 s with 2 threads under load, 0.6 s with 1), so the default is 1.

Prints a markdown table (paste it into docs/benchmarks.md) and a JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def _generation_speed(model, tokenizer, batch: int, new_tokens: int, repeats: int) -> float:
    from aigc.config import SampleConfig
    from aigc.generate import Request, generate

    config = SampleConfig(temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    requests = [Request(prompt=f"Review {i}: the film", config=config) for i in range(batch)]
    generate(model, tokenizer, requests[:1])  # warm-up (allocations, kernel selection)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        completions = generate(model, tokenizer, requests)
        best = min(best, time.perf_counter() - started)
    return sum(len(c.token_ids) for c in completions) / best


def _bits_per_byte(model, tokenizer, data: Path, docs: int, block_size: int) -> dict:
    from aigc.artifacts.dataset import open_split
    from aigc.evaluate.lm import byte_lengths, document_sequences, score_sequences, summarize

    sequences = document_sequences(open_split(data, "val"), tokenizer.eot_id, max_docs=docs)
    started = time.perf_counter()
    scores = score_sequences(model, sequences, [1] * len(sequences), block_size=block_size, batch_size=8)
    result = summarize(scores, byte_lengths(tokenizer))
    result["eval_seconds"] = time.perf_counter() - started
    return result


def _variants(run, workdir: Path) -> dict:
    """name -> (model, weights file) for fp32, int8 and bf16."""
    from safetensors.torch import save_model

    from aigc.artifacts.run import WEIGHTS
    from aigc.interop.quantize import export_int8
    from aigc.models import load_run

    int8_dir = export_int8(run, workdir / "int8")
    bf16 = load_run(run.path).model.to(torch.bfloat16)
    save_model(bf16, str(workdir / "bf16.safetensors"))
    return {
        "fp32": (run.model, run.path / WEIGHTS),
        "int8": (load_run(int8_dir).model, int8_dir / WEIGHTS),
        "bf16": (bf16, workdir / "bf16.safetensors"),
    }


def _table(results: dict) -> str:
    fp32 = results["fp32"]
    lines = [
        "| precision | weights file | generate tokens/s, batch 1 | generate tokens/s, batch 8 | scoring "
        "tokens/s | val bits/byte | val accuracy |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]

    def cell(r: dict, key: str, unit: str = "") -> str:
        return (
            f"{r[key]:.2f}{unit} ({r[key] / fp32[key]:.2f}x)" if unit else f"{r[key]:.0f} ({r[key] / fp32[key]:.2f}x)"
        )

    for name, r in results.items():
        cells = [cell(r, "file_mb", " MB"), cell(r, "tps_1"), cell(r, "tps_8"), cell(r, "score_tps")]
        lines.append(f"| {name} | {' | '.join(cells)} | {r['bits_per_byte']:.4f} | {r['accuracy']:.4f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a trained GPT (or LSTM) run")
    parser.add_argument("--data", required=True, help="the prepared dataset it was trained on (val split used)")
    parser.add_argument("--docs", type=int, default=0, help="validation documents scored per precision; 0 = all")
    parser.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (best is kept)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads; 1 avoids thread thrashing on a shared CPU"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from aigc.models import load_run

    run = load_run(args.run)
    block = run.config.model.block_size
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, run {args.run}", file=sys.stderr)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (model, weights) in _variants(run, Path(tmp)).items():
            print(f"measuring {name} ...", file=sys.stderr)
            lm = _bits_per_byte(model, run.tokenizer, Path(args.data), args.docs, block)
            results[name] = {
                "file_mb": weights.stat().st_size / 1e6,
                "tps_1": _generation_speed(model, run.tokenizer, 1, args.new_tokens, args.repeats),
                "tps_8": _generation_speed(model, run.tokenizer, 8, args.new_tokens, args.repeats),
                "bits_per_byte": lm["bits_per_byte"],
                "accuracy": lm["accuracy"],
                "score_tps": lm["tokens"] / lm["eval_seconds"],  # teacher-forced forward passes, batch 8
                "tokens_scored": lm["tokens"],
            }
    print(_table(results))
    print(json.dumps({"run": args.run, "threads": torch.get_num_threads(), "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
