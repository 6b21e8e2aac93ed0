"""`build_model`: a freshly initialised model of the configured kind."""

from __future__ import annotations

import torch.nn as nn

from aigc.config import ModelConfig
from aigc.models.gpt import GPT
from aigc.models.lstm import LSTM


def build_model(config: ModelConfig) -> nn.Module:
    return GPT(config) if config.kind == "gpt" else LSTM(config)
