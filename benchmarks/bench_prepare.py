"""Speed and memory of `aigc prepare`, plus our vectorised MinHash vs datasketch's, side by side.

1. Runs `aigc prepare SOURCE --out TMP` in a child process (default SOURCE: imdb) and reports wall
   seconds, MB/s of input text, CPU seconds (user + system, all threads), peak RSS of the child
   (`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`) and the time of each step from dataset.json.
   Targets: IMDb in under 20 s with under 2 GB peak RSS.
2. Times MinHash signatures for the same documents two ways in this process: `aigc.data.dedup.MinHasher`
   (numpy, a batch at a time) and datasketch's `MinHash.bulk` (one Python update per shingle), with the
   same shingles (3 consecutive word tokens) and the same number of hash functions.
3. With `--synthetic-mb N`, also prepares an N MB synthetic JSONL corpus, to show how time and peak RSS
   grow with the input (RSS should grow far slower than the input: the text is streamed and spooled).

    python benchmarks/bench_prepare.py [--source imdb] [--minhash-docs 2000] [--synthetic-mb 0]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_prepare(source: str, out: Path, extra: list[str]) -> dict:
    """Prepare in a child process; returns the figures of that one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    command = [sys.executable, "-m", "aigc", "prepare", source, "--out", str(out), "--overwrite", *extra]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    info = json.loads((out / "dataset.json").read_text(encoding="utf-8"))
    megabytes = info["counts"]["read"]["bytes"] / 1e6
    return {
        "source": source,
        "input_mb": round(megabytes, 1),
        "wall_s": round(wall, 2),
        "mb_per_s": round(megabytes / wall, 2),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
        # ru_maxrss of RUSAGE_CHILDREN is the largest child so far, in KiB on Linux.
        "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
        "steps_s": info["timings_s"],
        "tokens": sum(s["tokens"] for s in info["splits"].values()),
    }


def compare_minhash(texts: list[str]) -> dict:
    """Our batch MinHash vs datasketch's MinHash.bulk on the same shingle sets."""
    import numpy as np
    from datasketch import MinHash

    from aigc.data.dedup import NUM_PERM, MinHasher

    hasher = MinHasher()
    started = time.perf_counter()
    for i in range(0, len(texts), 200):
        hasher.signatures(texts[i : i + 200])
    ours = time.perf_counter() - started

    words = re.compile(r"[a-z0-9]+")
    started = time.perf_counter()
    shingle_sets = []
    for text in texts:
        tokens = words.findall(text.casefold())
        shingle_sets.append([" ".join(tokens[j : j + 3]).encode() for j in range(len(tokens) - 2)])
    MinHash.bulk(shingle_sets, num_perm=NUM_PERM)
    theirs = time.perf_counter() - started
    _ = np  # numpy is what makes ours fast; imported here so both sides pay their import up front
    return {
        "docs": len(texts),
        "ours_s": round(ours, 3),
        "datasketch_bulk_s": round(theirs, 3),
        "speedup": round(theirs / ours, 1),
    }


def synthetic_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """Distinct random-word documents (~1.3 kB each, like an IMDb review) written as JSONL."""
    rng = random.Random(seed)
    vocabulary = [f"{w}{i}" for i, w in enumerate(["film", "plot", "actor", "scene", "story", "music"] * 4000)]
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < megabytes * 1e6:
            line = json.dumps({"text": " ".join(rng.choices(vocabulary, k=200)), "label": rng.choice("ab")}) + "\n"
            f.write(line)
            written += len(line)


def imdb_texts(count: int) -> list[str]:
    from aigc.config import PrepareConfig
    from aigc.data.clean import clean_text
    from aigc.data.sources import ReadStats, read_source, resolve_source

    texts = []
    for text, _ in read_source(resolve_source("imdb"), PrepareConfig(), ReadStats()):
        texts.append(clean_text(text))
        if len(texts) == count:
            break
    return texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="imdb")
    parser.add_argument("--minhash-docs", type=int, default=2000, help="documents for the MinHash comparison")
    parser.add_argument("--synthetic-mb", type=int, default=0, help="also prepare a synthetic corpus this big")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["prepare"] = run = run_prepare(args.source, Path(tmp) / "out", [])
        print(
            f"aigc prepare {args.source}: {run['wall_s']} s wall, {run['mb_per_s']} MB/s of {run['input_mb']} MB, "
            f"{run['cpu_s']} CPU s, peak RSS {run['peak_rss_mb']} MB, {run['tokens']:,} tokens"
        )
        print("  steps (s): " + ", ".join(f"{k} {v}" for k, v in run["steps_s"].items()))
        print(
            f"  targets: < 20 s ({run['wall_s'] / 20:.2f} of it), < 2048 MB RSS ({run['peak_rss_mb'] / 2048:.2f} of it)"
        )
        if args.synthetic_mb:
            corpus = Path(tmp) / "synthetic.jsonl"
            synthetic_corpus(corpus, args.synthetic_mb)
            results["synthetic"] = big = run_prepare(str(corpus), Path(tmp) / "big", ["--label-column", "label"])
            print(
                f"synthetic {big['input_mb']} MB: {big['wall_s']} s, {big['mb_per_s']} MB/s, peak RSS "
                f"{big['peak_rss_mb']} MB (note: RUSAGE_CHILDREN keeps the largest child so far)"
            )
            print("  steps (s): " + ", ".join(f"{k} {v}" for k, v in big["steps_s"].items()))
    if args.minhash_docs:
        results["minhash"] = mh = compare_minhash(imdb_texts(args.minhash_docs))
        print(
            f"MinHash signatures for {mh['docs']} IMDb reviews: ours {mh['ours_s']} s, datasketch MinHash.bulk "
            f"{mh['datasketch_bulk_s']} s ({mh['speedup']}x)"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
