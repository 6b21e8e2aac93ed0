"""Decode back-ends: how a model of each kind prefills a batch of contexts and then takes one token per
row per step. `aigc.generate`'s loop drives them; the model's kind chooses one (`kinds.decode_backend`).

A back-end has `prefill(contexts) -> logits (B, V)`, `step(tokens (B, 1), rows) -> logits (B, V)` and
`keep(index)` (drop finished rows). `rows` are the loop's rows; a back-end reads only their `prefix` and
`window(limit)` (the prefix plus the latest tokens that fit), to slide a full context window.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from aigc.models.qlayers import quantised_weights
from aigc.models.quant import cores_to_pool


class KVCacheBackend:
    """Attention over a bounded context (`model.config.block_size`) with a key/value cache: prompts of
    different lengths are left-padded into one batch; a full cache slides its window."""

    def __init__(self, model: nn.Module, pad_id: int, device: torch.device):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.capacity = model.config.block_size
        # block-quantised weights on the CPU: the native products take PyTorch's threads in a step
        self.pool_steps = device.type == "cpu" and quantised_weights(model) > 0

    def prefill(self, contexts: list[list[int]]) -> torch.Tensor:
        """Fill a fresh cache with the contexts; logits (B, V) of each one's last position. Identical
        contexts (n samples of one prompt, the negative rows of guidance) are computed once and their
        cache rows copied, as vLLM shares a prompt's blocks among its samples."""
        unique = list(dict.fromkeys(tuple(ids) for ids in contexts))
        if len(unique) == len(contexts):
            return self._prefill(contexts)
        first_row = {ids: row for row, ids in enumerate(unique)}
        index = torch.tensor([first_row[tuple(ids)] for ids in contexts], device=self.device)
        logits = self._prefill([list(ids) for ids in unique])
        self.keep(index)  # (len(unique) rows) -> (B rows): cache and next positions copied per duplicate
        return logits[index]

    def _prefill(self, contexts: list[list[int]]) -> torch.Tensor:
        """Left-pad the contexts into one (B, T) batch, fill a fresh cache; logits of the last position."""
        width = max(len(c) for c in contexts)
        idx = torch.full((len(contexts), width), self.pad_id, dtype=torch.long)
        pad_mask = torch.zeros(len(contexts), width, dtype=torch.bool)
        for row, ids in enumerate(contexts):
            idx[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            pad_mask[row, width - len(ids) :] = True
        idx, pad_mask = idx.to(self.device), pad_mask.to(self.device)
        positions = (pad_mask.long().cumsum(dim=1) - 1).clamp(min=0)  # (B, T): real tokens count from 0
        self.next_position = positions[:, -1:] + 1  # (B, 1)
        self.cache = self.model.new_cache(len(contexts))
        padded = not all(len(c) == width for c in contexts)
        mask = pad_mask if padded else None
        logits, _ = self.model(idx, cache=self.cache, positions=positions, pad_mask=mask, last_only=True)
        return logits[:, -1]

    def step(self, tokens: torch.Tensor, rows: list) -> torch.Tensor:
        """tokens (B, 1) -> next logits (B, V); slides the window when the cache is full."""
        if self.cache.length >= self.capacity:
            return self.prefill([row.window(max(self.capacity // 2, len(row.prefix) + 1)) for row in rows])
        with cores_to_pool(len(tokens)) if self.pool_steps else contextlib.nullcontext():
            logits, _ = self.model(tokens, cache=self.cache, positions=self.next_position)
        self.next_position = self.next_position + 1
        return logits[:, -1]

    def keep(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)
        self.next_position = self.next_position[index]


class RecurrentBackend:
    """A model that carries a state instead of attending to a window: no context limit, no padding."""

    def __init__(self, model: nn.Module, pad_id: int, device: torch.device):
        self.model, self.device = model, device

    def prefill(self, contexts: list[list[int]]) -> torch.Tensor:
        """Run each context on its own (no padding can leak into the state), then stack the states."""
        states, last = [], []
        for ids in contexts:
            state = self.model.new_cache(1)
            logits, _ = self.model(torch.tensor([ids], dtype=torch.long, device=self.device), cache=state)
            states.append(state.hc)
            last.append(logits[:, -1])
        self.state = self.model.new_cache(len(contexts))
        self.state.hc = (torch.cat([h for h, _ in states], dim=1), torch.cat([c for _, c in states], dim=1))
        return torch.cat(last, dim=0)

    def step(self, tokens: torch.Tensor, rows: list) -> torch.Tensor:
        logits, _ = self.model(tokens, cache=self.state)
        return logits[:, -1]

    def keep(self, index: torch.Tensor) -> None:
        self.state.reorder(index)
