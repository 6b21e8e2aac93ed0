"""`prepare_dataset`: a raw corpus in, a dataset folder out (see docs/architecture.md for the format).

    read + clean + exact dedup + MinHash ─► spool (disk)      one streaming pass over the source
    near-duplicate search (LSH)            ─► keep mask        signatures only, no text
    redact + split                          ─► one spool per split
    tokenizer (train on the train split, or reuse one)
    encode in batches                       ─► {split}.bin + {split}.docs.npy
    dataset.json, then the temp folder is renamed to DIR

Everything is built in a temp folder beside DIR and published with a rename, so a failure or an
interruption never leaves half a dataset, and an existing dataset stays intact until the new one is
complete.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aigc.artifacts.dataset import DATASET_JSON, SPLITS, token_dtype, write_split
from aigc.config import PrepareConfig
from aigc.data.clean import Cleaner
from aigc.data.dedup import ExactDedup, MinHasher, near_duplicates
from aigc.data.publish import existing_dataset, publish
from aigc.data.redact import Redactor
from aigc.data.sources import ReadStats, Source, read_source, resolve_source, source_sha256
from aigc.data.spool import Spool
from aigc.errors import AigcError
from aigc.fsutil import write_json
from aigc.tokenizer import BYTE_ALPHABET, EOT, PAD, Tokenizer, label_token, text_pieces

FORMAT_VERSION = 1
MAX_LABELS = 256
_LABEL_NAME = re.compile(r"[^\s<>|]{1,40}")
_MINHASH_BATCH_CHARS = 256_000  # text per signature batch; keeps numpy temporaries small
_ENCODE_BATCH = 1024
_ENCODE_CHARS = 1 << 20  # text per call of the Rust encoder (it keeps ~250 bytes per token while it runs)

Progress = Callable[[str], None]


@dataclass
class _Collected:
    """The result of the streaming pass."""

    spool: Spool
    label_names: list[str]  # in first-seen order; spool label ids index this list
    signatures: np.ndarray | None  # (N, NUM_PERM) uint32, None when dedup is off
    counts: dict  # per step: read, clean, dedup


def prepare_dataset(source: str, out: Path, config: PrepareConfig, progress: Progress | None = None) -> dict:
    """Prepare `source` into the dataset folder `out`; returns the content of `out/dataset.json`.

    When `out` already holds the same dataset (same source checksum and options) it is reused as is.
    """
    started = time.perf_counter()
    report = progress or (lambda message: None)
    out = Path(os.path.abspath(out))  # so that `--out .` or `--out x/` still has a real parent and name
    src = resolve_source(source)
    checksum = source_sha256(src)
    options = {k: v for k, v in dataclasses.asdict(config).items() if k != "overwrite"}
    existing = existing_dataset(out, checksum, options, config.overwrite)
    if existing is not None:
        report(f"{out} already holds this dataset (same source and options); reusing it")
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        info = {"format_version": FORMAT_VERSION, "source": source, "source_sha256": checksum, "options": options}
        info.update(_build(src, tmp, config, report))
        info["elapsed_s"] = round(time.perf_counter() - started, 3)
        write_json(tmp / DATASET_JSON, info)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return info


def _build(src: Source, tmp: Path, config: PrepareConfig, report: Progress) -> dict:
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = round(now - clock, 3)
        clock = now

    report(f"reading {src.name}")
    collected = _collect(src, config, tmp, report)
    labels = _checked_labels(collected, config)
    lap("read_clean_exact_dedup")
    keep = np.ones(len(collected.spool), dtype=bool)
    if collected.signatures is not None:
        report(f"near-duplicate search over {len(keep):,} documents")
        keep = ~near_duplicates(collected.signatures, config.near_dup_threshold)
    collected.counts["dedup"]["near"] = int((~keep).sum())
    lap("near_dedup")
    report("redacting and splitting" if config.redact else "splitting")
    splits, redact_counts = _redact_and_split(collected, keep, labels, config, tmp)
    lap("redact_split")
    tokenizer, origin = _tokenizer(splits["train"], labels, config, report)
    tokenizer.save(tmp / "tokenizer.json")
    lap("tokenizer")
    report("encoding")
    split_info = _write_shards(tokenizer, splits, labels, tmp)
    lap("shards")
    counts = {**collected.counts, "redact": redact_counts, "split": {s: v["documents"] for s, v in split_info.items()}}
    return {**_summary(counts, split_info, labels, tokenizer, timings), **origin}


def _summary(counts: dict, split_info: dict, labels: list[str], tokenizer: Tokenizer, timings: dict) -> dict:
    text_bytes = sum(v["bytes"] for v in split_info.values())
    tokens = sum(v["tokens"] for v in split_info.values())
    distribution = {label: sum(v["label_distribution"].get(label, 0) for v in split_info.values()) for label in labels}
    return {
        "counts": counts,
        "splits": split_info,
        "bytes_per_token": round(text_bytes / tokens, 4) if tokens else 0.0,
        "labels": labels,
        "label_distribution": distribution,
        "vocab_size": tokenizer.vocab_size,
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        "tokenizer_fingerprint": tokenizer.vocab_fingerprint(),
        "timings_s": timings,
    }


# -- pass 1: read, clean, exact dedup, signatures -----------------------------------------------


class _Signer:
    """MinHash signatures computed in a worker thread while the main thread keeps reading and cleaning
    (numpy releases the GIL); datasketch, slow to import (scipy), is imported there first."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._pool.submit(importlib.import_module, "datasketch")
        self._hasher = MinHasher()
        self._done: list[np.ndarray] = []
        self._running: list[Future] = []
        self._pending: list[str] = []
        self._chars = 0

    def add(self, text: str) -> None:
        self._pending.append(text)
        self._chars += len(text)
        if self._chars >= _MINHASH_BATCH_CHARS:
            self._submit()

    def _submit(self) -> None:
        self._running.append(self._pool.submit(self._hasher.signatures, self._pending))
        self._pending, self._chars = [], 0
        while len(self._running) > 2:  # bounded: text waiting for the worker stays a few batches
            self._done.append(self._running.pop(0).result())

    def signatures(self) -> np.ndarray:
        """(N, NUM_PERM) for every text added, in order."""
        self._submit()
        self._done.extend(future.result() for future in self._running)
        self._running = []
        self.close()
        return np.concatenate(self._done)

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)


def _collect(src: Source, config: PrepareConfig, tmp: Path, report: Progress) -> _Collected:
    if config.label_column and src.kind in ("txt", "folder"):
        raise AigcError("--label-column needs a CSV/TSV, JSONL or Parquet source; .txt files carry no labels")
    read, cleaner, exact = ReadStats(), Cleaner(config.min_chars, config.max_chars), ExactDedup()
    spool, label_ids, label_names = Spool(tmp / "cleaned.spool"), {}, []
    signer, exact_removed = (_Signer() if config.dedup else None), 0
    try:
        for raw, label in read_source(src, config, read):
            text = cleaner(raw)
            if text is None:
                continue
            if config.dedup and exact.is_duplicate(text):
                exact_removed += 1
                continue
            if label is not None and label not in label_ids:
                _check_label_count(label_names, label, config)
                label_ids[label] = len(label_names)
                label_names.append(label)
            spool.append(text, -1 if label is None else label_ids[label])
            if signer is not None:
                signer.add(text)
            if read.documents % 100_000 == 0:
                report(f"read {read.documents:,} documents")
        signatures = signer.signatures() if signer is not None else None
    finally:
        spool.close()
        if signer is not None:
            signer.close()
    if not len(spool):
        raise AigcError(
            f"the corpus is empty after cleaning ({read.documents} documents read, {cleaner.stats.too_short} too "
            f"short, {cleaner.stats.too_long} too long); check --text-column and --min-chars/--max-chars"
        )
    counts = {
        "read": dataclasses.asdict(read),
        "clean": dataclasses.asdict(cleaner.stats),
        "dedup": {"enabled": config.dedup, "exact": exact_removed, "near": 0},
    }
    return _Collected(spool, label_names, signatures, counts)


def _check_label_count(label_names: list[str], new_label: str, config: PrepareConfig) -> None:
    if len(label_names) >= MAX_LABELS:
        shown = ", ".join(repr(v) for v in label_names[:5])
        raise AigcError(
            f"label column {config.label_column!r} has more than {MAX_LABELS} distinct values ({shown}, …, "
            f"{new_label!r}); a label is a category: choose a column with 2-{MAX_LABELS} values"
        )


def _checked_labels(collected: _Collected, config: PrepareConfig) -> list[str]:
    """Sorted label names, validated: 2..256 values, each usable inside a `<|label|>` token."""
    names = collected.label_names
    column = config.label_column or "label"
    if len(names) == 1:
        raise AigcError(
            f"label column {column!r} has a single value ({names[0]!r}); labels must tell documents apart: "
            "use a column with 2 or more values, or leave out --label-column"
        )
    for name in names:
        if not _LABEL_NAME.fullmatch(name) or label_token(name) in (EOT, PAD):
            raise AigcError(
                f"label value {name!r} in column {column!r} cannot name a control token (1-40 characters, no "
                "spaces, no '<', '>' or '|', not 'endoftext'/'pad'); clean the label column"
            )
    labels = sorted(names)
    if not config.tokenizer:
        minimum = BYTE_ALPHABET + 2 + len(labels) + 1  # mirrors Tokenizer.train, checked before the slow steps
        if config.vocab_size < minimum:
            raise AigcError(
                f"--vocab-size {config.vocab_size} is too small: the byte alphabet plus {2 + len(labels)} special "
                f"tokens need at least {minimum}; use --vocab-size {max(minimum, 512)} or more"
            )
    return labels


# -- pass 2: redact and split ---------------------------------------------------------------


def _split_sizes(count: int, config: PrepareConfig) -> tuple[int, int]:
    def share(fraction: float) -> int:
        return 0 if fraction == 0 else max(1, round(count * fraction))

    n_val, n_test = share(config.val_fraction), share(config.test_fraction)
    if count - n_val - n_test < 1:
        raise AigcError(
            f"only {count} documents remain after cleaning and de-duplication, too few for the requested "
            "splits; add data or lower --val-fraction/--test-fraction"
        )
    return n_val, n_test


def assign_splits(count: int, config: PrepareConfig) -> np.ndarray:
    """(count,) int8: 0 = train, 1 = val, 2 = test; a seeded permutation, whole documents only."""
    n_val, n_test = _split_sizes(count, config)
    order = np.random.default_rng(config.seed).permutation(count)
    assignment = np.zeros(count, dtype=np.int8)
    assignment[order[:n_val]] = 1
    assignment[order[n_val : n_val + n_test]] = 2
    return assignment


def _redact_and_split(
    collected: _Collected, keep: np.ndarray, labels: list[str], config: PrepareConfig, tmp: Path
) -> tuple[dict[str, Spool], dict]:
    """Write each kept document, redacted, to the spool of its split (label ids now index `labels`)."""
    remap = np.array([labels.index(name) for name in collected.label_names] + [-1], dtype=np.int32)
    assignment = assign_splits(int(keep.sum()), config)
    wanted = [s for s, f in zip(SPLITS, (1.0, config.val_fraction, config.test_fraction)) if f > 0]
    spools = {split: Spool(tmp / f"{split}.spool") for split in wanted}
    redactor = Redactor() if config.redact else None
    kept_index = 0
    for index, (text, label) in enumerate(collected.spool):
        if not keep[index]:
            continue
        if redactor is not None:
            text = redactor(text)
        spools[SPLITS[assignment[kept_index]]].append(text, int(remap[label]))
        kept_index += 1
    for spool in spools.values():
        spool.close()
    collected.spool.remove()
    if redactor is None:
        return spools, {"enabled": False}
    return spools, {"enabled": True, **redactor.counts, "documents": redactor.documents}


# -- tokenizer and shards -------------------------------------------------------------------


def _tokenizer(train: Spool, labels: list[str], config: PrepareConfig, report: Progress) -> tuple[Tokenizer, dict]:
    """The tokenizer of the dataset, and what dataset.json records about where it came from."""
    if config.tokenizer:
        base = reused_tokenizer(config.tokenizer)
        tokenizer = base.with_labels(labels)
        added = [label for label in labels if label not in base.labels]
        what = f", control tokens added for {', '.join(added)}" if added else ""
        report(f"reusing tokenizer {config.tokenizer} ({base.vocab_size} tokens{what})")
        if not added:
            return tokenizer, {}
        # A model made with `base` takes this dataset once its embedding grows by the added rows.
        return tokenizer, {"base_tokenizer_fingerprint": base.vocab_fingerprint(), "base_vocab_size": base.vocab_size}
    report(f"training a {config.vocab_size}-token BPE tokenizer on {len(train):,} documents")
    return Tokenizer.train((text for text, _ in train), config.vocab_size, labels), {}


def reused_tokenizer(value: str) -> Tokenizer:
    """`--tokenizer`: a tokenizer.json, a run folder, or the name of a pulled model (`smollm2-135m`).

    A run's tokenizer takes its labels from the run's record, so an imported model's chat tokens
    (`<|im_start|>`) are not mistaken for labels."""
    # Deferred: the run module imports torch, which only this path needs.
    from aigc.artifacts.run import CONFIG, TOKENIZER, read_run_config, read_run_tokenizer, resolve_run_dir

    path = Path(value)
    run_dir = resolve_run_dir(value) if not path.is_file() else path.parent
    if path.is_file() and not (run_dir / CONFIG).is_file():
        return Tokenizer.load(path)  # a bare tokenizer.json: its special `<|name|>` tokens are its labels
    if not (run_dir / TOKENIZER).is_file():
        raise AigcError(
            f"--tokenizer {value}: no {TOKENIZER} there; pass a tokenizer.json, a run folder or a model name"
        )
    return read_run_tokenizer(run_dir, read_run_config(run_dir))


def _encoder(tokenizer: Tokenizer) -> Callable[[list[str]], list[np.ndarray]]:
    """Batch encoding without character offsets (`encode_batch_fast`, tokenizers >= 0.20): the same
    ids, about 15 % less work. Long documents go in pieces (`text_pieces`) of a bounded total per
    call, so memory follows the piece size, not the document; ids come back as (n,) uint32 arrays."""
    fast = getattr(tokenizer.hf, "encode_batch_fast", None)
    if fast is None:
        fast = tokenizer.hf.encode_batch
    split = tokenizer.splits_safely

    def encode(texts: list[str]) -> list[np.ndarray]:
        pieces, owners = [], []
        for i, text in enumerate(texts):
            for piece in text_pieces(text) if split else (text,):
                pieces.append(piece)
                owners.append(i)
        parts: list[list[np.ndarray]] = [[] for _ in texts]
        for start, end in _bounded_groups([len(p) for p in pieces], _ENCODE_CHARS):
            for owner, e in zip(owners[start:end], fast(pieces[start:end], add_special_tokens=False)):
                parts[owner].append(np.asarray(e.ids, dtype=np.uint32))
        return [np.concatenate(p) if len(p) != 1 else p[0] for p in parts]

    return encode


def _bounded_groups(sizes: list[int], limit: int) -> Iterator[tuple[int, int]]:
    """Consecutive (start, end) ranges of `sizes` whose total stays within `limit` (at least one each)."""
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and total + size > limit:
            yield start, i
            start, total = i, 0
        total += size
    if start < len(sizes):
        yield start, len(sizes)


def _framed(tokenizer: Tokenizer, spool: Spool, label_ids: list[int]) -> Iterator[list[int]]:
    """Token ids of each document laid out as `[<|label|>] tokens… <|endoftext|>`.

    The next batch is encoded in a worker thread (tokenizers releases the GIL and uses all cores)
    while this thread frames and writes the current one."""
    eot = np.asarray([tokenizer.eot_id], dtype=np.uint32)
    encode = _encoder(tokenizer)
    with ThreadPoolExecutor(max_workers=1) as pool:
        batches = spool.batches(_ENCODE_BATCH)
        batch = next(batches, None)
        pending = pool.submit(encode, [text for text, _ in batch]) if batch else None
        while batch is not None:
            encoded = pending.result()
            following = next(batches, None)
            if following is not None:
                pending = pool.submit(encode, [text for text, _ in following])
            for ids, (_, label) in zip(encoded, batch):
                prefix = [label_ids[label]] if label >= 0 else []
                yield np.concatenate((np.asarray(prefix, dtype=np.uint32), ids, eot))
            batch = following


def _write_shards(tokenizer: Tokenizer, spools: dict[str, Spool], labels: list[str], tmp: Path) -> dict:
    label_ids = [tokenizer.label_id(label) for label in labels]
    info = {}
    for split, spool in spools.items():
        stats = write_split(tmp, split, _framed(tokenizer, spool, label_ids), spool.labels, tokenizer.vocab_size)
        label_index = np.frombuffer(spool.labels, dtype=np.int32) if len(spool) else np.zeros(0, np.int32)
        distribution = {label: int((label_index == i).sum()) for i, label in enumerate(labels)}
        info[split] = {**stats, "bytes": spool.nbytes, "label_distribution": distribution}
        spool.remove()
    return info
