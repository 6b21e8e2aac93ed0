"""The model a training session starts from: fresh, the --init-from run's, or a frozen base with LoRA.

Fine-tuning grows the base's vocabulary to the dataset's (label tokens that prepare appended), each new
row initialised from its label's word (`models.kinds.grow_vocabulary`). Under LoRA the base is loaded through its
hash-checked reference and stays frozen; only the adapters and the new rows train.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from aigc.artifacts.run import WEIGHTS, load_weights, read_run_config, resolve_run_dir
from aigc.config import TrainConfig
from aigc.errors import AigcError
from aigc.models import adapted, build_model, kinds, lora
from aigc.train.setup import SessionPlan, freeze_embeddings


@dataclass(frozen=True)
class TrainingModel:
    model: nn.Module
    lora: lora.LoRASpec | None = None
    base_ref: str | None = None  # a LoRA run's base: a pulled name or a run folder
    base_sha: str | None = None  # sha256 of the base's weights, checked whenever the run loads


def build_training_model(plan: SessionPlan, cfg: TrainConfig) -> TrainingModel:
    """Call after seeding torch: a fresh model's initialisation draws from its generator."""
    spec = lora.spec_from_config(cfg)
    if spec is not None:  # before the optimizer is built: it takes only trainable parameters
        return _lora_model(plan, spec)
    fresh_finetune = plan.init_from and not plan.resume
    model = _base_model(plan) if fresh_finetune else build_model(plan.model_config)
    if cfg.freeze_embeddings:
        freeze_embeddings(model)
    return TrainingModel(model)


def _base_model(plan: SessionPlan) -> nn.Module:
    """The --init-from run's model, its vocabulary grown to the dataset's (new label tokens)."""
    base_dir = resolve_run_dir(plan.init_from)
    model = build_model(read_run_config(base_dir).model)
    load_weights(model, base_dir / WEIGHTS)
    return kinds.grow_vocabulary(model, plan.data.tokenizer, plan.model_config.vocab_size)


def _lora_model(plan: SessionPlan, spec: lora.LoRASpec) -> TrainingModel:
    """Base (frozen, hash-checked) + new vocabulary rows + adapters: only the last two train."""
    if not plan.init_from:
        raise AigcError("--lora-rank needs --init-from RUN: adapters fine-tune a trained model")
    if plan.resume:
        saved = read_run_config(plan.run_dir).weights
        base_ref, base_sha = saved.base, saved.base_sha256
    else:
        base_ref = adapted.base_reference(plan.init_from)
        base_sha = adapted.weights_sha256(resolve_run_dir(plan.init_from))
    if base_ref is None:
        raise AigcError(f"{plan.run_dir} is a LoRA run from an older aigc (no base named); start it again")
    _, model = adapted.load_base(base_ref, base_sha)
    lora.apply_lora(model, spec)
    grown = kinds.grow_vocabulary(model, plan.data.tokenizer, plan.model_config.vocab_size, frozen=True)
    return TrainingModel(grown, spec, base_ref, base_sha)
