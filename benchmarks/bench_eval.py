"""Benchmark of the memorisation index behind `aigc eval`: build and query time on IMDb-size tokens.

Usage: python benchmarks/bench_eval.py [--data DIR] [--tokens 8000000] [--samples 128]

Without --data, the train split is synthetic: Zipf-distributed token ids (vocabulary 8192) with
recurring phrases pasted in, the size of IMDb's train split (~7.75M tokens). With --data, the real
train split of a prepared dataset is used. Queries are 128-token samples, half holding a copied
train span of 40 tokens. The side-by-side baseline is a scan per sample (every train window compared
with every sample window by numpy), timed on a few samples and scaled to all of them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from aigc.evaluate.memorise import NgramIndex


def synthetic_tokens(count: int, seed: int = 0) -> np.ndarray:
    """Zipfian ids plus 20,000 recurring 12-token phrases, so that common n-grams repeat as in text."""
    rng = np.random.default_rng(seed)
    tokens = (rng.zipf(1.2, size=count) % 8192).astype(np.uint16)
    phrases = (rng.zipf(1.2, size=(200, 12)) % 8192).astype(np.uint16)
    for start in rng.integers(0, count - 12, size=20_000):
        tokens[start : start + 12] = phrases[rng.integers(0, 200)]
    return tokens


def queries(tokens: np.ndarray, count: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(count):
        sample = (rng.zipf(1.2, size=128) % 8192).astype(np.int64)
        if i % 2 == 0:  # plant a 40-token verbatim train span
            start = int(rng.integers(0, len(tokens) - 40))
            at = int(rng.integers(0, 88))
            sample[at : at + 40] = tokens[start : start + 40]
        samples.append(sample)
    return samples


def scan_longest(tokens: np.ndarray, sample: np.ndarray, n: int) -> int:
    """Baseline: find each sample n-gram by comparing it with every train window (O(N) per window)."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, n)  # (N - n + 1, n) view, no copy
    first = tokens[: len(tokens) - n + 1]
    best = 0
    for i in range(len(sample) - n + 1):
        candidates = np.flatnonzero(first == sample[i])
        hits = candidates[(windows[candidates] == sample[i : i + n]).all(axis=1)]
        for start in hits[:64]:
            length = n
            while (
                i + length < len(sample)
                and start + length < len(tokens)
                and tokens[start + length] == sample[i + length]
            ):
                length += 1
            best = max(best, length)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="prepared dataset folder whose train split to index")
    parser.add_argument("--tokens", type=int, default=7_750_000, help="synthetic train tokens")
    parser.add_argument("--samples", type=int, default=128, help="samples queried")
    parser.add_argument("--scan-samples", type=int, default=4, help="samples timed with the scan baseline")
    args = parser.parse_args()
    if args.data:
        from aigc.artifacts.dataset import open_split

        tokens = np.asarray(open_split(args.data, "train").tokens)
        source = f"train split of {args.data}"
    else:
        tokens = synthetic_tokens(args.tokens)
        source = "synthetic Zipf tokens with recurring phrases"
    samples = queries(tokens, args.samples)
    start = time.perf_counter()
    index = NgramIndex(tokens, n=8)
    build = time.perf_counter() - start
    start = time.perf_counter()
    spans = [index.longest_span(s) for s in samples]
    query = time.perf_counter() - start
    start = time.perf_counter()
    scanned = [scan_longest(tokens, s, 8) for s in samples[: args.scan_samples]]
    scan = (time.perf_counter() - start) / args.scan_samples
    assert scanned == spans[: args.scan_samples], (scanned, spans[: args.scan_samples])
    print(f"train tokens:      {len(tokens):,} ({source})")
    print(f"index build:       {build:.2f} s (8-gram hashes, one sort)")
    print(
        f"query:             {query:.2f} s for {len(samples)} samples of 128 tokens "
        f"({query / len(samples) * 1e3:.1f} ms each)"
    )
    print(
        f"planted spans:     {sum(s >= 40 for s in spans)} of {len(samples) // 2 + len(samples) % 2} "
        "found with length >= 40"
    )
    print(f"scan per sample:   {scan * 1e3:.0f} ms each (baseline, measured on {args.scan_samples} samples)")
    print(
        f"query speed-up:    {scan / (query / len(samples)):.0f}x; build + query vs scan for {len(samples)} samples: "
        f"{build + query:.1f} s vs {scan * len(samples):.1f} s"
    )


if __name__ == "__main__":
    main()
