"""`aigc plot RUN [RUN ...]`: training curves (loss, accuracy; train vs validation) as PNG files."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aigc.errors import AigcError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw training curves of one or more runs",
        description=(
            "Write loss.png and accuracy.png (train vs validation, over steps and over tokens) from each "
            "run's metrics.jsonl. One run: into RUN/plots/. Several runs: overlaid in one figure each, "
            "written to --out (default: the first run's plots/ folder)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders made by `aigc train`")
    parser.add_argument("--out", type=Path, help="folder for the figures (default: FIRST_RUN/plots)")
    parser.add_argument("--overwrite", action="store_true", help="replace figures that already exist in --out")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    # Deferred: a slow import that only this path needs.
    from aigc.plots import CURVES, plot_runs

    if args.out is not None and not args.overwrite:
        existing = [name for name, *_ in CURVES if (args.out / name).exists()]
        if existing:
            raise AigcError(f"--out {args.out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    for path in plot_runs(args.runs, args.out):
        print(path)
    print(f"aigc plot: wrote {len(args.runs)} run(s) into {path.parent}", file=sys.stderr)
    return 0
