"""The prepared dataset folder (written by `aigc prepare`, read by `aigc train` and `aigc eval`).

    DIR/dataset.json       provenance, options, counts, labels, vocabulary size, token dtype, fingerprint
    DIR/tokenizer.json     the tokenizer the shards were made with
    DIR/{split}.bin        token ids, uint16 when the vocabulary fits, else uint32
    DIR/{split}.docs.npy   int64 (N, 3): start, end (exclusive), label index (-1 = no label)
    DIR/{split}.mask.bin   optional, uint8 per token: 1 where the loss counts (instruction data: the
                           assistant's tokens); training sets the targets of the others to -1

Every document is `[<|label|>] tokens… <|endoftext|>`, and its offsets span all of it. Nothing but this
module reads or writes the shard files; `open_dataset` is the one way to read a folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aigc.errors import AigcError
from aigc.tokenizer import Tokenizer

SPLITS = ("train", "val", "test")
DATASET_JSON = "dataset.json"
TOKENIZER = "tokenizer.json"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass(frozen=True)
class Split:
    """One split of a prepared dataset: tokens (memory-mapped) and its document table."""

    tokens: np.ndarray  # (num_tokens,) memmap, never fully loaded
    docs: np.ndarray  # (N, 3) int64: start, end, label index
    mask: np.ndarray | None = None  # (num_tokens,) uint8 memmap: 1 = learn this token; None = learn all

    def __len__(self) -> int:
        return len(self.tokens)

    def document(self, i: int) -> np.ndarray:
        start, end, _ = self.docs[i]
        return np.asarray(self.tokens[start:end])


def write_split(
    folder: str | os.PathLike,
    split: str,
    documents: Iterable[Sequence[int]],
    labels: Iterable[int],
    vocab_size: int,
) -> dict[str, int]:
    """Stream documents (token ids, framing included) to `{split}.bin` and their offsets to `.docs.npy`.

    Writes to temporary names; the caller publishes the whole dataset folder at once.
    """
    folder = Path(folder)
    dtype = token_dtype(vocab_size)
    table = []
    position = 0
    with open(folder / f"{split}.bin", "wb") as f:
        for ids, label in zip(documents, labels):
            array = np.asarray(ids, dtype=dtype)
            f.write(array.tobytes())
            table.append((position, position + len(array), label))
            position += len(array)
    docs = np.asarray(table, dtype=np.int64).reshape(-1, 3)
    np.save(folder / f"{split}.docs.npy", docs)
    return {"documents": len(docs), "tokens": position}


def read_dataset_info(folder: str | os.PathLike) -> dict:
    folder = Path(folder)
    path = folder / DATASET_JSON
    if not folder.is_dir():
        raise AigcError(f"data folder not found: {folder}; create it with `aigc prepare SOURCE --out {folder}`")
    if not path.is_file():
        raise AigcError(
            f"{folder} is not a prepared dataset (no {DATASET_JSON}); run `aigc prepare SOURCE --out {folder}`"
        )
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AigcError(f"{path} is corrupted ({exc}); prepare the data again with --overwrite") from exc
    if not isinstance(info, dict):
        raise AigcError(f"{path} is not a dataset description (not a JSON object); prepare the data again")
    return info


def open_split(folder: str | os.PathLike, split: str, vocab_size: int | None = None) -> Split:
    """Memory-map one split of a prepared dataset folder, checked so that damaged shards are an
    AigcError naming the file, never an IndexError deep in training (`vocab_size`: the largest
    token id + 1 allowed; default: the one dataset.json records)."""
    folder = Path(folder)
    info = read_dataset_info(folder)
    bin_path, docs_path = folder / f"{split}.bin", folder / f"{split}.docs.npy"
    if not bin_path.is_file() or not docs_path.is_file():
        raise AigcError(f"{folder} has no {split} split; prepare it with a --{split}-fraction > 0")
    try:
        dtype = np.dtype(info.get("token_dtype", "uint16"))
    except TypeError:
        raise AigcError(f"{folder / DATASET_JSON} names an unknown token_dtype; prepare the data again") from None
    if dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
        raise AigcError(f"{folder / DATASET_JSON} names token_dtype {dtype}, not uint16/uint32; prepare the data again")
    size = bin_path.stat().st_size
    if size % dtype.itemsize:
        raise AigcError(f"{bin_path} is truncated (not a whole number of {dtype} tokens); prepare the data again")
    tokens = np.zeros(0, dtype=dtype) if size == 0 else np.memmap(bin_path, dtype=dtype, mode="r")
    labels = info.get("labels")  # None in hand-made folders: then label indices are not checked
    docs = _read_docs(docs_path, bin_path, len(tokens), len(labels) if isinstance(labels, list) else None)
    limit = vocab_size if vocab_size is not None else info.get("vocab_size")
    if isinstance(limit, int) and len(tokens) and int(_max_token(tokens)) >= limit:
        raise AigcError(f"{bin_path} holds token ids beyond the vocabulary ({limit}); it is damaged, prepare it again")
    return Split(tokens=tokens, docs=docs, mask=_open_mask(folder / f"{split}.mask.bin", len(tokens)))


def write_mask(folder: str | os.PathLike, split: str, masks: Iterable[Sequence[bool]]) -> int:
    """Write `{split}.mask.bin`: the documents' loss masks, concatenated in the order of `write_split`."""
    count = 0
    with open(Path(folder) / f"{split}.mask.bin", "wb") as f:
        for mask in masks:
            f.write(np.asarray(mask, dtype=np.uint8).tobytes())
            count += len(mask)
    return count


def _open_mask(path: Path, num_tokens: int) -> np.ndarray | None:
    if not path.is_file():
        return None
    if path.stat().st_size != num_tokens:
        raise AigcError(f"{path} does not match its token shard (truncated?); prepare the data again")
    return np.memmap(path, dtype=np.uint8, mode="r") if num_tokens else np.zeros(0, dtype=np.uint8)


def _read_docs(path: Path, bin_path: Path, num_tokens: int, num_labels: int | None) -> np.ndarray:
    """The (N, 3) document table, checked: contiguous offsets covering all `num_tokens`, labels known."""
    damaged = f"{path} is damaged or does not match {bin_path.name} (truncated?); prepare the data again"
    try:
        docs = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, SyntaxError) as exc:  # numpy's header parser raises SyntaxError
        raise AigcError(f"{path} is damaged ({type(exc).__name__}); prepare the data again") from None
    if docs.dtype != np.int64 or docs.ndim != 2 or docs.shape[1] != 3:
        raise AigcError(damaged)
    starts, ends, labels = docs[:, 0], docs[:, 1], docs[:, 2]
    contiguous = len(docs) == 0 or (starts[0] == 0 and np.array_equal(starts[1:], ends[:-1]))
    if (
        not contiguous
        or (starts > ends).any()
        or (len(docs) and ends[-1] != num_tokens)
        or (not len(docs) and num_tokens)
    ):
        raise AigcError(damaged)
    if num_labels is not None and ((labels < -1) | (labels >= num_labels)).any():  # -1 = unlabelled document
        raise AigcError(damaged)
    return docs


def _max_token(tokens: np.ndarray, chunk: int = 1 << 24) -> int:
    """Largest id in a memory-mapped split, read a chunk at a time (bounded memory)."""
    return max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))


@dataclass(frozen=True)
class Dataset:
    """A prepared dataset folder, opened: its description, tokenizer and the train/val splits."""

    path: Path
    info: dict
    tokenizer: Tokenizer
    train: Split
    val: Split

    @property
    def labels(self) -> tuple[str, ...]:
        return self.tokenizer.labels

    def provenance(self) -> dict:
        """What a run's config.json records about the data it was trained on."""
        return {
            "path": str(self.path),
            "labels": list(self.tokenizer.labels),
            "tokenizer_fingerprint": self.tokenizer.vocab_fingerprint(),
            "train_tokens": len(self.train),
            "val_tokens": len(self.val),
            "source": self.info.get("source"),
        }


def open_dataset(folder: str | os.PathLike) -> Dataset:
    path = Path(folder).resolve()
    info = read_dataset_info(path)
    tokenizer = Tokenizer.load(path / TOKENIZER, info.get("labels"))
    splits = (open_split(path, name, tokenizer.vocab_size) for name in ("train", "val"))
    return Dataset(path, info, tokenizer, *splits)


def check_same_tokenizer(
    dataset_dir: Path, dataset_tokenizer: Tokenizer, tokenizer: Tokenizer, owner: Path, *, fix: str | None = None
) -> None:
    """A dataset is only usable with the tokenizer it was made with.

    `owner` is the run (or base model) that `tokenizer` belongs to; `fix` replaces the default advice
    (prepare the data again with the owner's tokenizer)."""
    if dataset_tokenizer.vocab_fingerprint() != tokenizer.vocab_fingerprint():
        fix = fix or f"prepare it again with `aigc prepare SOURCE --out DIR --tokenizer {owner / TOKENIZER}`"
        raise AigcError(f"the dataset at {dataset_dir} was tokenized with a different tokenizer than {owner}; {fix}")
