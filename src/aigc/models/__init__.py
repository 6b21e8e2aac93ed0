"""Models behind one contract: `forward(idx, targets=None) -> (logits, loss | None)`; what differs per
kind (context limit, decode back-end, vocabulary growth, description) is asked of `kinds.py`.

Importing this package registers the built-in weight loaders (`loaders.py`), so `load_run` here
loads any run folder.
"""

from __future__ import annotations

from aigc.artifacts.run import Run, load_run
from aigc.models import loaders  # noqa: F401  (registers the weight loaders)
from aigc.models.build import build_model
from aigc.models.gpt import GPT, KVCache
from aigc.models.kinds import context_limit, describe, describe_run
from aigc.models.lstm import LSTM, LSTMState

__all__ = [
    "GPT",
    "LSTM",
    "KVCache",
    "LSTMState",
    "Run",
    "build_model",
    "context_limit",
    "describe",
    "describe_run",
    "load_run",
]
