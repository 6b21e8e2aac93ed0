"""Training-loop speed of two checkouts, side by side: `aigc train` end to end (batches, step, metrics).

Runs `python -m aigc train` from each source tree in alternating rounds on one prepared dataset (the
built-in Rotten Tomatoes snippets) and reads tokens/s from the run's last metrics line, so batch reading, the
optimizer step and the training-accuracy bookkeeping all count.

    .venv/bin/python benchmarks/bench_loop.py --before /path/to/old/src --after src [--rounds 3] [--steps 150]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path


def run_aigc(src: str, args: list[str]) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    subprocess.run([sys.executable, "-m", "aigc", *args], env=env, check=True, capture_output=True)


def train_speed(src: str, data: Path, out: Path, steps: int) -> float:
    run_aigc(
        src,
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(out),
            "--preset",
            "small",
            "--max-steps",
            str(steps),
            "--eval-every",
            str(steps),
            "--quiet",
            "--overwrite",
        ],
    )
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return last["tokens_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", required=True)
    parser.add_argument("--after", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        run_aigc(args.after, ["prepare", "rotten-tomatoes", "--out", str(data)])
        speeds: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(args.rounds):
            for name in ("before", "after"):
                speeds[name].append(train_speed(getattr(args, name), data, Path(tmp) / name, args.steps))
    best = {name: max(values) for name, values in speeds.items()}
    for name, values in speeds.items():
        print(f"{name:7s} tokens/s per round: {', '.join(f'{v:,.0f}' for v in values)}  best {best[name]:,.0f}")
    print(f"after / before (best of {args.rounds}): {best['after'] / best['before']:.2f}x")


if __name__ == "__main__":
    main()
