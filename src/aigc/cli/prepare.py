"""`aigc prepare SOURCE --out DIR`: raw corpus → cleaned, de-duplicated, redacted, tokenised dataset."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from aigc.cli.args import add_dataclass_args, dataclass_from_args
from aigc.config import PrepareConfig

DESCRIPTION = """\
Turn a raw corpus into a dataset folder for `aigc train`: clean (HTML, Unicode NFC, control
characters, whitespace, length filters), remove exact and near duplicates (MinHash LSH), redact
personal data, split into train/val/test by document, train a byte-level BPE tokenizer on the
train split, and write memory-mapped token shards plus dataset.json.

SOURCE is `imdb` (25,000 movie reviews, labels pos/neg), `rotten-tomatoes` (8,530 snippets), a
.txt file (documents separated by blank lines), a folder of .txt files, or a .csv/.tsv/.jsonl/
.parquet file with a text column and an optional label column."""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="turn a raw corpus into token shards and a tokenizer",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", help="imdb, rotten-tomatoes, or a file / folder path")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="dataset folder to create")
    parser.add_argument(
        "--chat-template-from",
        metavar="RUN",
        help="SOURCE is OpenAI fine-tuning JSONL ({'messages': [...]} per line): render it with RUN's chat "
        "template and tokenizer, with a loss mask on the assistant's tokens (instruction fine-tuning)",
    )
    add_dataclass_args(parser, PrepareConfig)
    aliases = parser.add_argument_group("aliases")
    aliases.add_argument(
        "--text-field",
        dest="text_column",
        default=argparse.SUPPRESS,
        metavar="TEXT_COLUMN",
        help="same as --text-column (the word JSONL users expect)",
    )
    aliases.add_argument(
        "--label-field",
        dest="label_column",
        default=argparse.SUPPRESS,
        metavar="LABEL_COLUMN",
        help="same as --label-column",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # Deferred: a slow import that only this path needs.
    from aigc.data.prepare import prepare_dataset

    config = dataclass_from_args(args, PrepareConfig)
    if args.chat_template_from:
        return _instructions(args, config)
    started = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    info = prepare_dataset(args.source, args.out, config, progress=progress)
    print(summary(info, args.out))
    return 0


def _instructions(args: argparse.Namespace, config: PrepareConfig) -> int:
    # Deferred: a slow import that only this path needs.
    from aigc.data.instructions import prepare_instructions

    info = prepare_instructions(
        args.source,
        args.out,
        args.chat_template_from,
        val_fraction=config.val_fraction,
        seed=config.seed,
        overwrite=config.overwrite,
    )
    print(f"prepared {args.source} -> {args.out} (chat template of {args.chat_template_from})")
    for split, counts in info["splits"].items():
        print(
            f"  {split:<5} {counts['documents']:,} conversations, {counts['tokens']:,} tokens, "
            f"{counts['assistant_tokens']:,} learnt (assistant)"
        )
    return 0


def summary(info: dict, out: Path) -> str:
    """A few lines a person can read: counts per step, splits, tokenizer, time."""
    counts = info["counts"]
    read, clean, dedup, redact = counts["read"], counts["clean"], counts["dedup"], counts["redact"]
    lines = [
        f"prepared {info['source']} -> {out}",
        f"  read      {read['documents']:,} documents ({read['invalid_utf8_bytes']:,} invalid UTF-8 bytes replaced, "
        f"{read['bad_lines_skipped']:,} bad lines skipped)",
        f"  clean     {clean['kept']:,} kept, {clean['too_short']:,} too short, {clean['too_long']:,} too long",
        f"  dedup     {dedup['exact']:,} exact and {dedup['near']:,} near duplicates removed"
        if dedup.get("enabled", True)
        else "  dedup     off",
    ]
    if redact.get("enabled"):
        found = ", ".join(f"{redact[k]:,} {k}" for k in ("EMAIL", "PHONE", "CARD", "IP"))
        lines.append(f"  redact    {found} (in {redact['documents']:,} documents)")
    else:
        lines.append("  redact    off")
    splits = ", ".join(f"{name} {s['documents']:,} docs / {s['tokens']:,} tokens" for name, s in info["splits"].items())
    lines.append(f"  split     {splits}")
    labels = ", ".join(f"{k} {v:,}" for k, v in info["label_distribution"].items()) or "none"
    lines.append(f"  labels    {labels}")
    lines.append(
        f"  tokenizer {info['vocab_size']:,} tokens ({info['token_dtype']}), {info['bytes_per_token']:.2f} bytes/token"
    )
    lines.append(f"  time      {info['elapsed_s']:.1f}s")
    return "\n".join(lines)
