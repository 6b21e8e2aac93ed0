"""What the training loop reports to its caller (`on_event`); the library itself never prints.

Events come from the main process only (rank 0 of a data-parallel run). A callback may raise
`KeyboardInterrupt` to stop training cleanly: a checkpoint is saved first, as on Ctrl-C.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from aigc.config import ModelConfig, TrainConfig
from aigc.tokenizer import Tokenizer


@dataclass(frozen=True)
class TrainStart:
    run_dir: Path
    step: int  # optimizer steps already done (0 unless resuming)
    model_config: ModelConfig
    train_config: TrainConfig
    num_params: int
    description: str  # the model in one line for people (`aigc.models.describe`): family, size, shape
    device: str
    dtype: str  # "fp32" or "bf16"
    world_size: int
    resumed: bool
    init_from: str | None
    notes: tuple[str, ...] = ()  # warnings worth showing to the user


@dataclass(frozen=True)
class TrainStep:
    step: int  # optimizer steps done
    tokens: int  # training tokens seen (all processes)
    loss: float  # this step's training loss
    lr: float
    tokens_per_s: float  # recent training throughput (all processes)
    elapsed_s: float
    progress: float  # share of the budget used, 0..1


@dataclass(frozen=True)
class TrainEval:
    metrics: dict[str, Any]  # the line just appended to metrics.jsonl
    is_best: bool  # val loss improved, best.safetensors updated
    model: nn.Module  # the plain model in eval mode (to draw samples from); back to train mode afterwards
    tokenizer: Tokenizer


@dataclass(frozen=True)
class TrainEnd:
    run_dir: Path
    step: int
    reason: str  # "max_steps", "max_tokens", "minutes" or "already done"
    metrics: dict[str, Any] | None  # the last evaluation


Event = TrainStart | TrainStep | TrainEval | TrainEnd
EventCallback = Callable[[Event], None]


class TrainingInterrupted(KeyboardInterrupt):
    """Raised after Ctrl-C (or a callback's KeyboardInterrupt) once a checkpoint has been saved."""

    def __init__(self, run_dir: Path, step: int):
        super().__init__(f"training interrupted at step {step}; checkpoint saved in {run_dir}")
        self.run_dir = run_dir
        self.step = step
