"""`build_model`: a freshly initialised model of the configured kind (the kinds are in `kinds.py`)."""

from __future__ import annotations

import torch.nn as nn

from aigc.config import ModelConfig
from aigc.models.kinds import kind_of


def build_model(config: ModelConfig) -> nn.Module:
    return kind_of(config).model_class(config)
