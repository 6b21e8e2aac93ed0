"""Language-modelling metrics: loss, perplexity, bits per byte and next-token accuracy.

Any sequence longer than the context is scored with overlapping windows (stride half a block), so
every token after the first block is predicted from at least half a block of context: the usual
sliding-window evaluation. Windows are grouped by length and right-padded into batches; padding
sits after the real tokens, so with causal attention it never changes what they see.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Padded tokens per scoring batch: bounds wasted work and the (rows, width, vocab) logits (0.8 GB of
# fp32 for a 49k vocabulary).
MAX_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class _Window:
    sequence: int  # which input sequence
    start: int  # first input position
    length: int  # input tokens; targets are positions start+1 .. start+length
    score_from: int  # first target position counted


def _windows(index: int, length: int, first_target: int, block: int) -> list[_Window]:
    """Windows covering target positions [first_target, length) of one sequence."""
    stride = max(1, block // 2)
    # The first scored token gets at least `block - stride` tokens of context (all of it if it fits).
    start = max(0, min(first_target - 1 - (block - stride), length - 1 - block))
    windows, scored = [], first_target - 1  # `scored`: last target position already covered
    while scored < length - 1:
        size = min(block, length - 1 - start)
        windows.append(_Window(index, start, size, scored + 1))
        scored = start + size
        start += stride
    return windows


@torch.inference_mode()
def score_sequences(
    model: torch.nn.Module,
    sequences: Sequence[Sequence[int]],
    first_targets: Sequence[int],
    *,
    block_size: int,
    batch_size: int = 16,
    max_batch_tokens: int = MAX_BATCH_TOKENS,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per sequence: (targets, nll in nats, correct) for target positions >= its `first_targets` entry.

    Position p's target is `sequence[p]`, predicted from the tokens before it (within one window).
    Up to `batch_size` windows go through the model at once, fewer where rows × longest window would
    pass `max_batch_tokens`; their logits take rows × width × vocab floats.
    """
    device = next(model.parameters()).device
    windows = [w for k, seq in enumerate(sequences) for w in _windows(k, len(seq), first_targets[k], block_size)]
    windows.sort(key=lambda w: w.length)
    pieces: list[list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]] = [[] for _ in sequences]
    for batch in _batches(windows, batch_size, max_batch_tokens):
        width = max(w.length for w in batch)
        inputs = torch.zeros(len(batch), width, dtype=torch.long)
        targets = torch.full((len(batch), width), -1, dtype=torch.long)
        for row, w in enumerate(batch):
            seq = torch.as_tensor(sequences[w.sequence][w.start : w.start + w.length + 1], dtype=torch.long)
            inputs[row, : w.length] = seq[:-1]
            skip = w.score_from - w.start - 1  # targets before score_from were counted by an earlier window
            targets[row, skip : w.length] = seq[1 + skip :]
        logits, _ = model(inputs.to(device))  # (B, T, V)
        flat = logits.float().view(-1, logits.size(-1))  # (B*T, V); a transposed view made this 10x slower
        nll = F.cross_entropy(flat, targets.view(-1).to(device), ignore_index=-1, reduction="none")
        nll = nll.view(len(batch), width).cpu()
        correct = logits.argmax(dim=-1).cpu() == targets  # (B, T)
        for row, w in enumerate(batch):
            keep = targets[row] >= 0
            pieces[w.sequence].append(
                (w.score_from, targets[row][keep].numpy(), nll[row][keep].numpy(), correct[row][keep].numpy())
            )
    return [_join(parts) for parts in pieces]


def _batches(windows: Sequence[_Window], batch_size: int, max_tokens: int) -> list[list[_Window]]:
    """Consecutive runs of the length-sorted windows. A batch is padded to its longest window, so a
    few long documents among short ones would multiply the work (12 IMDb reviews in one batch of 16
    computed 3x their tokens); the token cap keeps long windows in batches of their own."""
    batches: list[list[_Window]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and (len(batches[-1]) + 1) * w.length <= max_tokens:
            batches[-1].append(w)
        else:
            batches.append([w])
    return batches


def _join(parts: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts.sort(key=lambda p: p[0])  # windows were batched by length; restore position order
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, bool)
    return tuple(np.concatenate([p[i] for p in parts]) for i in (1, 2, 3))  # type: ignore[return-value]


def byte_lengths(tokenizer) -> np.ndarray:
    """(V,) number of UTF-8 bytes each token stands for (0 for special tokens)."""
    return np.array([len(tokenizer.token_bytes(i)) for i in range(tokenizer.vocab_size)], dtype=np.int64)


def summarize(scores: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]], token_bytes: np.ndarray) -> dict:
    """Pool per-token scores into loss, perplexity, bits per byte and accuracy (token-weighted)."""
    targets = np.concatenate([s[0] for s in scores]) if scores else np.zeros(0, np.int64)
    nll = np.concatenate([s[1] for s in scores]).astype(np.float64) if scores else np.zeros(0)
    correct = np.concatenate([s[2] for s in scores]) if scores else np.zeros(0, bool)
    if not len(targets):
        return {"tokens": 0, "loss": None, "perplexity": None, "bits_per_byte": None, "accuracy": None}
    total, num_bytes = float(nll.sum()), int(token_bytes[targets].sum())
    loss = total / len(targets)
    return {
        "tokens": int(len(targets)),
        "bytes": num_bytes,
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "bits_per_byte": total / math.log(2) / num_bytes if num_bytes else None,
        "accuracy": float(correct.mean()),
    }


def document_sequences(split, eot_id: int, max_docs: int = 0) -> list[list[int]]:
    """Whole documents of a split, each preceded by the end-of-text that precedes it in training."""
    count = len(split.docs) if max_docs <= 0 else min(max_docs, len(split.docs))
    return [[eot_id] + split.document(i).tolist() for i in range(count)]
