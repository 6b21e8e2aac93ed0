"""Models behind one contract: `forward(idx, targets=None) -> (logits, loss | None)`."""

from __future__ import annotations

import torch.nn as nn

from aigc.config import ModelConfig
from aigc.models.gpt import GPT, KVCache
from aigc.models.lstm import LSTM, LSTMState

__all__ = ["GPT", "LSTM", "KVCache", "LSTMState", "build_model"]


def build_model(config: ModelConfig) -> nn.Module:
    """A freshly initialised model of the configured kind."""
    return GPT(config) if config.kind == "gpt" else LSTM(config)
