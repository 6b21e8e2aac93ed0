"""A document spool: texts appended once to a scratch file, then read back in order.

Preparation passes over the corpus several times (dedup, redaction and split, tokenizer training,
encoding). Spooling the cleaned text to disk keeps memory flat: RAM holds only 12 bytes per document
(end offset and label index), whatever the size of the corpus.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterator
from pathlib import Path

_READ_BATCH = 1024


class Spool:
    """Append `(text, label index)` pairs, call `close()`, then iterate them as many times as needed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self.ends = array("q")  # end byte offset of each document
        self.labels = array("i")  # label index per document, -1 = none
        self._size = 0

    def append(self, text: str, label: int = -1) -> None:
        data = text.encode("utf-8")
        self._file.write(data)
        self._size += len(data)
        self.ends.append(self._size)
        self.labels.append(label)

    def close(self) -> None:
        self._file.close()

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def nbytes(self) -> int:
        """UTF-8 bytes of all documents."""
        return self._size

    def __iter__(self) -> Iterator[tuple[str, int]]:
        start = 0
        with open(self.path, "rb") as f:
            for end, label in zip(self.ends, self.labels):
                yield f.read(end - start).decode("utf-8"), label
                start = end

    def batches(self, size: int = _READ_BATCH) -> Iterator[list[tuple[str, int]]]:
        batch: list[tuple[str, int]] = []
        for item in self:
            batch.append(item)
            if len(batch) == size:
                yield batch
                batch = []
        if batch:
            yield batch

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)
