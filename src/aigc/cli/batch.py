"""`aigc batch RUN --input rows.csv --template "..{field}.." --out F`: one generation per table row.

Each row fills the template; the output holds the input rows plus a `generated` column. The output
file is rewritten atomically after every chunk of rows, so it is always a complete, valid table of
the rows done so far, and `--resume` continues after them.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import string
import sys
from pathlib import Path

from aigc.cli.args import add_dataclass_args, dataclass_from_args, text
from aigc.cli.generate import add_run_args, load
from aigc.cli.structured import add_structured_args, grammar_from_args, json_columns
from aigc.config import SampleConfig
from aigc.errors import AigcError
from aigc.fsutil import parse_jsonl_objects, read_user_text, write_text

OUTPUT_COLUMN = "generated"
FORMATS = (".csv", ".jsonl")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="generate one text per row of a CSV/JSONL table",
        description=(
            "Fill --template from each row of --input (CSV or JSONL), generate, and write the input "
            f"rows plus a '{OUTPUT_COLUMN}' column to --out (CSV or JSONL, by extension). The output is "
            "rewritten atomically after each chunk; --resume skips the rows it already holds."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_args(parser)
    parser.add_argument("--input", required=True, type=Path, help="rows to fill the template from (.csv or .jsonl)")
    parser.add_argument(
        "--template",
        required=True,
        type=text("--template"),
        help='prompt template, e.g. "Write a {sentiment} review of {title}:"',
    )
    parser.add_argument("--out", required=True, type=Path, help="output table (.csv or .jsonl)")
    parser.add_argument(
        "--label-field", type=text("--label-field"), help="condition each row on the label named in this field"
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="instruction mode: each filled template is a user message, rendered with RUN's chat template",
    )
    parser.add_argument("--system", type=text("--system"), help="system prompt for every row (implies --chat)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted --out, skipping its rows")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--batch-size", type=int, default=16, help="rows decoded together (1..256)")
    add_structured_args(parser)
    parser.add_argument(
        "--json-columns", action="store_true", help="with --json-schema/--json-object: each field in its own column"
    )
    add_dataclass_args(parser, SampleConfig)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    config = dataclass_from_args(args, SampleConfig)
    if not 1 <= args.batch_size <= 256:
        raise AigcError(f"--batch-size must be in [1, 256], got {args.batch_size}")
    _check_format(args.input, "--input")
    _check_format(args.out, "--out")
    rows = read_rows(args.input)
    prompts = [fill_template(args.template, row, n) for n, row in enumerate(rows, start=1)]
    labels = _labels(rows, args.label_field)
    done = _done_rows(args, rows)
    grammar = grammar_from_args(args)
    if args.json_columns and grammar is None:
        raise AigcError("--json-columns needs --json-schema FILE or --json-object")

    # Deferred: a slow import that only this path needs.
    from tqdm import tqdm

    from aigc.cli.generate import warn_if_truncated
    from aigc.generate import Request, generate

    chat = args.chat or args.system is not None
    if chat and args.label_field:
        raise AigcError("--label-field conditions plain generation; leave it out with --chat / --system")
    run = load(args)
    _check_labels(run.tokenizer, labels)
    if chat:
        base = _chat_requests(run, prompts, args.system, config)
    else:
        longest = max(range(len(rows)), key=lambda i: len(prompts[i]))
        warn_if_truncated(run, prompts[longest], labels[longest], "batch")
        base = [Request(prompts[i], labels[i], config) for i in range(len(rows))]
    cut = 0  # rows whose JSON the token limit cut short
    with tqdm(total=len(rows), initial=len(done), unit="row", file=sys.stderr, desc="aigc batch") as progress:
        for start in range(len(done), len(rows), args.batch_size):
            chunk = range(start, min(start + args.batch_size, len(rows)))
            requests = [
                dataclasses.replace(base[i], config=_row_config(base[i].config, i), grammar=grammar) for i in chunk
            ]
            completions = generate(run.model, run.tokenizer, requests)
            cut += sum(c.complete is False for c in completions)
            taken = {OUTPUT_COLUMN, *(key for i in chunk for key in rows[i])}
            fields = [json_columns(c.text, taken) if args.json_columns else {} for c in completions]
            done += [{**rows[i], OUTPUT_COLUMN: c.text, **f} for i, c, f in zip(chunk, completions, fields)]
            write_rows(args.out, done)
            progress.update(len(chunk))
    if cut:
        print(f"aigc batch: {cut} row(s) have incomplete JSON (--max-new-tokens ran out inside it)", file=sys.stderr)
    print(f"aigc batch: wrote {len(done)} rows to {args.out}", file=sys.stderr)
    return 0


def _chat_requests(run, prompts: list[str], system: str | None, config: SampleConfig) -> list:
    """One chat request per row: [system,] user = the filled template, rendered with the run's template;
    a row too long for the context is an error naming it, and answers never run past the context."""
    # Deferred: slow imports (torch) that only this path needs.
    from aigc.chat import Message, encode_chat, load_chat_template, room_left
    from aigc.generate import Request, context_limit

    template = load_chat_template(run.path)
    context = context_limit(run.model)
    head = [Message("system", system)] if system else []
    requests = []
    for n, prompt in enumerate(prompts, start=1):
        try:
            chat = encode_chat(template, run.tokenizer, [*head, Message("user", prompt)], context=context)
        except AigcError as exc:
            raise AigcError(f"row {n}: {exc}") from None
        room = room_left(len(chat.ids), context, config.max_new_tokens)
        row_config = dataclasses.replace(config, max_new_tokens=room)
        requests.append(Request(prompt_ids=chat.ids, stop_ids=chat.stop_ids, config=row_config))
    return requests


def _check_format(path: Path, flag: str) -> None:
    if path.suffix.lower() not in FORMATS:
        raise AigcError(f"{flag} {path} must end in .csv or .jsonl")


def read_rows(path: Path) -> list[dict]:
    """The rows of a CSV (header line first) or JSONL (one object per line) file."""
    try:
        text = read_user_text(path, what="--input", encoding="utf-8-sig")  # spreadsheet exports add a BOM
    except FileNotFoundError:
        raise AigcError(f"--input file not found: {path}; check the path") from None
    rows = _parse_table(text, path)
    if not rows:
        raise AigcError(f"--input {path} holds no rows")
    if OUTPUT_COLUMN in rows[0]:
        raise AigcError(f"--input {path} already has a '{OUTPUT_COLUMN}' column; rename or drop it")
    return rows


def _parse_table(text: str, path: Path) -> list[dict]:
    if path.suffix.lower() != ".jsonl":
        return list(csv.DictReader(io.StringIO(text)))
    return [row for _, row in parse_jsonl_objects(text, path)]


def fill_template(template: str, row: dict, n: int) -> str:
    """The template with `{field}` replaced by the row's values; a missing field names the row."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise AigcError(f"bad --template ({exc}); write fields as {{name}} and literal braces as {{{{ }}}}") from None
    if any(not name for name in fields):
        raise AigcError("--template fields need names, e.g. {title}; positional {} is not allowed")
    for name in fields:
        if name not in row:
            known = ", ".join(row) or "none"
            raise AigcError(f"row {n} has no field '{name}' that --template needs; its fields: {known}")
    return template.format_map(row)


def _labels(rows: list[dict], field: str | None) -> list[str | None]:
    if field is None:
        return [None] * len(rows)
    labels = []
    for n, row in enumerate(rows, start=1):
        if row.get(field) in (None, ""):
            raise AigcError(f"row {n} has no value in --label-field '{field}'")
        labels.append(str(row[field]))
    return labels


def _check_labels(tokenizer, labels: list[str | None]) -> None:
    for n, label in enumerate(labels, start=1):
        if label is not None:
            try:
                tokenizer.label_id(label)
            except AigcError as exc:
                raise AigcError(f"row {n}: {exc}") from None


def _done_rows(args: argparse.Namespace, rows: list[dict]) -> list[dict]:
    """Rows already in --out (with --resume), checked to be the first rows of --input."""
    if not args.out.exists():
        return []
    if not args.resume:
        if args.overwrite:
            return []
        raise AigcError(f"--out {args.out} exists; pass --resume to continue it or --overwrite to replace it")
    done = read_rows_done(args.out)
    if len(done) > len(rows):
        raise AigcError(f"--out {args.out} has more rows ({len(done)}) than --input ({len(rows)}); wrong --out?")
    for n, (old, row) in enumerate(zip(done, rows), start=1):
        if {k: str(v) for k, v in old.items() if k != OUTPUT_COLUMN} != {k: str(v) for k, v in row.items()}:
            raise AigcError(f"row {n} of --out {args.out} differs from --input; resume with the same input")
    return [{**row, OUTPUT_COLUMN: old[OUTPUT_COLUMN]} for old, row in zip(done, rows)]


def read_rows_done(path: Path) -> list[dict]:
    rows = _parse_table(path.read_text(encoding="utf-8-sig"), path)
    if rows and OUTPUT_COLUMN not in rows[0]:
        raise AigcError(f"--out {path} has no '{OUTPUT_COLUMN}' column, so it is not an aigc batch output")
    return rows


def _row_config(config: SampleConfig, index: int) -> SampleConfig:
    """Row i gets seed + i, so a seeded run gives the same text per row however it is chunked or resumed."""
    return config if config.seed is None else dataclasses.replace(config, seed=config.seed + index)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write the table atomically in the format its extension names."""
    if path.suffix.lower() == ".jsonl":
        write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())
