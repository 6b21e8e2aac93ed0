"""`aigc import DIR --out RUN`: make a run of a local Hugging Face GPT-2-type folder."""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="make a run of a local Hugging Face GPT-2-type folder (weights + tokenizer)",
        description=(
            "Reads config.json, model.safetensors (or pytorch_model.bin) and tokenizer.json (or vocab.json + "
            "merges.txt) from DIR and writes a run that aigc generate/eval/serve open and that aigc train "
            "--init-from fine-tunes. Adds a <|pad|> token (and one embedding row) when the tokenizer has none."
        ),
    )
    parser.add_argument("source", metavar="DIR", help="local Hugging Face model folder; nothing is downloaded")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder to create (must be new or empty)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    parser.set_defaults(handler=run_import)


def run_import(args: argparse.Namespace) -> int:
    # Deferred: a slow import that only this path needs.
    from aigc.artifacts.run import read_run_config
    from aigc.interop.hf import import_hf

    started = time.perf_counter()
    out = import_hf(args.source, args.out, overwrite=args.overwrite)
    config = read_run_config(out)
    c = config.model
    added = " (added <|pad|>)" if config.extra["imported_from"]["added_pad_token"] else ""
    print(
        f"imported {args.source} to {out}: GPT-2 with {c.n_layer} layers, {c.n_embd} wide, "
        f"vocabulary {c.vocab_size}{added}, context {c.block_size} ({time.perf_counter() - started:.1f}s)",
        file=sys.stderr,
    )
    return 0
