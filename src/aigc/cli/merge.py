"""`aigc merge RUN [--out RUN2]`: fold a LoRA run's adapters into its weights."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "merge",
        help="fold the LoRA adapters of a run into its weights (W + alpha/r * B A)",
        description=(
            "Writes plain weights (no adapters) so that the run loads, exports and serves like any other, and "
            "keeps the adapters alone in adapter.safetensors. Without --out the run is merged in place."
        ),
    )
    parser.add_argument("run", metavar="RUN", help="run trained with aigc train --lora-rank R")
    parser.add_argument("--out", metavar="RUN2", help="write the merged run here instead of merging RUN in place")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    parser.set_defaults(handler=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    # Deferred: a slow import that only this path needs.
    from aigc.interop.merge import merge_run

    out, counts = merge_run(args.run, args.out, overwrite=args.overwrite)
    print(f"merged the adapters of {args.run} into {out} ({counts['total']:,} parameters; adapters kept in "
          f"{out / 'adapter.safetensors'})", file=sys.stderr)  # fmt: skip
    return 0
