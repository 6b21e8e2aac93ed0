"""Training and validation batches cut from the memory-mapped token shards.

A batch is `B` windows of `block_size + 1` consecutive tokens; inputs are the first `block_size`,
targets the same shifted by one. Only the windows are read from disk, never the whole corpus.

Reproducibility: training windows come from a seeded numpy Generator whose state is saved in
`state.pt`, so a resumed run draws exactly the batches an uninterrupted one would. In a data-parallel
run every process draws the same *global* batch and keeps its own slice, so N processes see exactly
the data one process with an N-times larger batch would see.
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from aigc.errors import AigcError


def check_split_size(num_tokens: int, split: str, block_size: int, windows: int = 1) -> None:
    """A split must hold `windows` distinct windows of `block_size + 1` tokens."""
    need = windows * (block_size + 1)
    if num_tokens < need:
        what = (
            f"{windows} windows of --block-size {block_size} + 1"
            if windows > 1
            else f"one window of --block-size {block_size} + 1"
        )
        raise AigcError(
            f"the {split} split has only {num_tokens} tokens but {what} need {need}; "
            "use a smaller --batch-size or --block-size, or prepare more data"
        )


def _gather(tokens: np.ndarray, starts: np.ndarray, block_size: int, device: torch.device, mask=None):
    """(B,) start offsets -> inputs and targets, each (B, block_size) int64 on `device`. With a loss
    `mask` (instruction data), targets the mask does not mark become -1, which the loss ignores."""
    rows = np.stack([np.asarray(tokens[s : s + block_size + 1], dtype=np.int64) for s in starts])
    batch = torch.from_numpy(rows)  # (B, T + 1)
    if device.type == "cuda":
        batch = batch.pin_memory().to(device, non_blocking=True)
    else:
        batch = batch.to(device)
    inputs, targets = batch[:, :-1], batch[:, 1:]
    if mask is not None:
        keep = np.stack([np.asarray(mask[s + 1 : s + block_size + 1], dtype=bool) for s in starts])  # (B, T)
        targets = targets.masked_fill(~torch.from_numpy(keep).to(device), -1)
    return inputs, targets


class BatchSampler:
    """Random training windows; `state()`/`set_state()` make the stream resumable exactly.

    The next batch is read from disk (and, on CUDA, copied to the GPU) on a background thread while
    the current step runs. The windows are drawn on the caller's thread, so the stream is the same
    as without prefetching, and `state()` is the state before the prefetched batch was drawn."""

    def __init__(
        self,
        tokens: np.ndarray,
        block_size: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        mask: np.ndarray | None = None,
        starts: np.ndarray | None = None,
    ):
        """`starts`: the offsets windows may start at (`document_starts`); None = anywhere."""
        self.tokens, self.mask = tokens, mask
        # With a mask, windows start only where at least one target counts (else the loss would be 0/0).
        if mask is not None:
            learnable = learnable_starts(mask, block_size)
            starts = learnable if starts is None else np.intersect1d(starts, learnable)
        self.starts = starts
        self.block_size = block_size
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="aigc-batches")
        self._pending: tuple[str, Future] | None = None  # (rng state before drawing it, the batch)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (inputs, targets), each (B, block_size) on `device`; prefetches the one after."""
        pending = self._pending or self._prefetch(device)
        self._pending = self._prefetch(device)
        return pending[1].result()

    def _prefetch(self, device: torch.device) -> tuple[str, Future]:
        state = self._rng_state()
        high = len(self.tokens) - self.block_size if self.starts is None else len(self.starts)
        starts = self.rng.integers(0, high, size=self.batch_size * self.world_size)  # the global batch
        if self.starts is not None:
            starts = self.starts[starts]
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return state, self._reader.submit(_gather, self.tokens, mine, self.block_size, device, self.mask)

    def _rng_state(self) -> str:
        # JSON text: PCG64's 128-bit integers survive it, and `weights_only` loading accepts strings.
        return json.dumps(self.rng.bit_generator.state)

    def state(self) -> str:
        return self._pending[0] if self._pending is not None else self._rng_state()

    def set_state(self, state: str) -> None:
        self._discard_pending()
        self.rng.bit_generator.state = json.loads(state)

    def _discard_pending(self) -> None:
        if self._pending is not None:
            self._pending[1].result()  # let the read finish before its memory goes
            self._pending = None

    def close(self) -> None:
        self._discard_pending()
        self._reader.shutdown(wait=True)


def document_starts(docs: np.ndarray, num_tokens: int, block_size: int) -> np.ndarray:
    """Window starts that open the documents of a split's (N, 3) table, where a whole window fits: at
    the end-of-text token that ends the document before (none before the first), then the document,
    whose control token comes first: the prefix [end-of-text, label] that every generation's prompt has."""
    starts = np.maximum(np.asarray(docs[:, 0], dtype=np.int64) - 1, 0)
    starts = starts[starts < num_tokens - block_size]
    if not len(starts):
        raise AigcError("no document starts a whole training window; pass --windows anywhere or a smaller --seq-len")
    return starts


def learnable_starts(mask: np.ndarray, block_size: int) -> np.ndarray:
    """Window starts s (< len - block_size) whose targets mask[s + 1 : s + block_size + 1] hold a 1."""
    counts = np.concatenate([[0], np.cumsum(np.asarray(mask, dtype=np.int64))])  # counts[i] = sum(mask[:i])
    starts = np.arange(len(mask) - block_size)
    learnable = counts[starts + block_size + 1] - counts[starts + 1] > 0
    found = starts[learnable]
    if not len(found):
        raise AigcError("the loss mask marks no token to learn in any window; check the instruction data")
    return found


def fixed_windows(tokens: np.ndarray, block_size: int, count: int, mask: np.ndarray | None = None) -> np.ndarray:
    """`count` start offsets spread evenly over a split: the same evaluation set every time. With a
    loss `mask`, spread over the windows that have a target to learn (`learnable_starts`)."""
    if mask is None:
        high = len(tokens) - block_size - 1
        return np.linspace(0, high, num=count).round().astype(np.int64)
    candidates = learnable_starts(mask, block_size)
    return candidates[np.linspace(0, len(candidates) - 1, num=count).round().astype(np.int64)]


def eval_batches(
    tokens: np.ndarray, starts: np.ndarray, block_size: int, batch_size: int, device: torch.device, mask=None
):
    """Yield (inputs, targets) over the given window starts, `batch_size` windows at a time; with a
    loss `mask`, unmarked targets are -1 as in training."""
    for i in range(0, len(starts), batch_size):
        yield _gather(tokens, starts[i : i + batch_size], block_size, device, mask)
