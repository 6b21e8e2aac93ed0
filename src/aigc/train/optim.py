"""AdamW and the learning-rate schedule (linear warm-up, then cosine decay to a floor)."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from aigc.config import TrainConfig
from aigc.models.vocab import NEW_ROWS


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Parameters that weight decay would only hurt: embeddings (tied to the output layer in the GPT),
    biases and LayerNorm gains, i.e. everything that is not a matrix of a Linear/LSTM layer."""
    ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    ids |= {id(p) for p in model.parameters() if p.dim() < 2}
    return ids


def _label_row_ids(model: nn.Module) -> set[int]:
    """The new label rows that LoRA trains beside the adapters (`models.vocab.NEW_ROWS`)."""
    return {id(p) for name, p in model.named_parameters() if name.rsplit(".", 1)[-1] == NEW_ROWS}


def build_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the parameters that require grad (frozen ones, e.g. under LoRA, are left out).

    The fused kernel (one pass over all parameters, no per-tensor Python loop) runs on CPU and CUDA;
    other devices use the multi-tensor `foreach` path."""
    params = [p for p in model.parameters() if p.requires_grad]
    no_decay = _no_decay_ids(model)
    # A group of their own only when scaled, so runs saved before the option keep their two groups.
    labels = _label_row_ids(model) if config.label_lr_scale != 1.0 else set()
    groups = [
        {"params": [p for p in params if id(p) not in no_decay | labels], "weight_decay": config.weight_decay},
        {"params": [p for p in params if id(p) in no_decay - labels], "weight_decay": 0.0},
        {"params": [p for p in params if id(p) in labels], "weight_decay": 0.0, "lr_scale": config.label_lr_scale},
    ]
    groups = [g for g in groups if g["params"]]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(
        groups,
        lr=config.learning_rate,
        betas=(config.beta1, config.beta2),
        fused=fused,
        foreach=None if fused else True,
    )


def learning_rate(step: int, progress: float, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based).

    A cosine from the peak down to `min_lr_ratio * peak` over the budget, scaled by a linear warm-up
    over the first `warmup_steps` steps (so there is no jump where warm-up ends). `progress` in [0, 1]
    is the share of the budget used (steps, tokens or wall clock, whichever is furthest along), so a
    `--minutes` run decays on time.
    """
    peak = config.learning_rate
    floor = peak * config.min_lr_ratio
    progress = min(max(progress, 0.0), 1.0)
    cosine = floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (peak - floor)
    warmup = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    return cosine * warmup


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
