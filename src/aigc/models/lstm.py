"""The classic text-generation baseline: Embedding → LSTM → Dense (softmax over the vocabulary).

Same contract as the GPT, `forward(idx, targets=None) -> (logits, loss | None)`, so the two compare
on the same data and budget. For decoding, the carried hidden state lives in an `LSTMState`.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from aigc.config import ModelConfig


class LSTMState:
    """Hidden and cell state carried between decode steps; updated in place by `LSTM.forward`."""

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.hc: tuple[torch.Tensor, torch.Tensor] | None = None  # each (layers, B, H)
        self.length = 0

    def reorder(self, index: torch.Tensor) -> None:
        if self.hc is not None:
            self.hc = (self.hc[0][:, index], self.hc[1][:, index])


class LSTM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        assert config.kind == "lstm"
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.lstm = nn.LSTM(
            config.n_embd,
            config.hidden_size,
            num_layers=config.n_layer,
            batch_first=True,
            dropout=config.dropout if config.n_layer > 1 else 0.0,
        )
        self.dense = nn.Linear(config.hidden_size, config.vocab_size)

    def new_cache(self, batch_size: int, device=None, dtype=None) -> LSTMState:
        return LSTMState(batch_size)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        cache: LSTMState | None = None,
        return_logits: bool = True,
    ):
        """idx (B, T) -> logits (B, T, V); with `cache`, continue from (and update) its state.
        return_logits is accepted for the training loop's sake; the logits are always returned."""
        x = self.embedding(idx)  # (B, T, E)
        hc = cache.hc if cache is not None else None
        out, new_hc = self.lstm(x, hc)  # (B, T, H)
        if cache is not None:
            cache.hc = new_hc
            cache.length += idx.size(1)
        logits = self.dense(out)  # (B, T, V)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embedding.weight.numel() if non_embedding else n

    def flops_per_token(self, training: bool = True) -> float:
        """Matmul FLOPs per token: 2 per weight forward (4 gates per LSTM layer), ×3 with backward."""
        c = self.config
        lstm_weights = sum(p.numel() for name, p in self.lstm.named_parameters() if "weight" in name)
        forward = 2 * (lstm_weights + c.hidden_size * c.vocab_size)
        return 3 * forward if training else forward
