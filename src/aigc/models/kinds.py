"""The one seam per model kind: everything that differs between a GPT and an LSTM, in one registry.

Callers never compare `ModelConfig.kind`; they ask this module (a test enforces it):

    kind_of(config).model_class(config)      a fresh model of the configured kind (`build.build_model`)
    context_limit(model)                     most tokens attended at once (None: carried state, no limit)
    decode_backend(model, pad_id, device)    how `aigc.generate` prefills and steps the model
    grows_vocabulary(config)                 whether new label tokens can be added to a trained model
    grow_vocabulary(model, tokenizer, size)  add those rows (initialised from each label's word)
    family(config)                           "Llama", "GPT-2", "LSTM", ... (for people and exporters)
    describe(model) / describe_run(...)      family, shape and parameter counts, one line for people

A new kind is a module in `models/` and one `ModelKind` entry in `KINDS` (and its name in
`config.MODEL_KINDS`, whose validation is the only other place that reads the name).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from aigc.artifacts.run import RunConfig
from aigc.config import MODEL_KINDS, ModelConfig
from aigc.errors import AigcError
from aigc.models import vocab
from aigc.models.decode import KVCacheBackend, RecurrentBackend
from aigc.models.gpt import GPT
from aigc.models.lstm import LSTM
from aigc.models.qlayers import quantised_weights
from aigc.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelKind:
    model_class: Callable[[ModelConfig], nn.Module]
    family: Callable[[ModelConfig], str]  # e.g. "Llama", "GPT-2", "LSTM"
    shape: Callable[[ModelConfig], str]  # layers, widths, heads, context, vocabulary
    context_limit: Callable[[ModelConfig], int | None]
    backend: type  # a decode back-end class (models/decode.py): (model, pad_id, device)
    # (model, tokenizer, vocab_size, frozen) -> model with rows added; None: the vocabulary is fixed.
    grow: Callable[[nn.Module, Tokenizer, int, bool], nn.Module] | None


def _transformer_family(config: ModelConfig) -> str:
    """The architecture family of the GPT's field mix (litgpt-style: one class, configured by fields)."""
    styles = (config.norm, config.positions, config.mlp)
    if styles == ("rmsnorm", "rotary", "swiglu"):
        return "Llama"
    if styles == ("layernorm", "learned", "gelu"):
        return "GPT-2"
    return f"transformer ({', '.join(styles)})"


def _transformer_shape(config: ModelConfig) -> str:
    heads = f"{config.n_head} heads" + (f" ({config.kv_heads} key/value)" if config.kv_heads != config.n_head else "")
    return (
        f"{config.n_layer} layers × {config.n_embd}, {heads}, context {config.block_size}, "
        f"vocabulary {config.vocab_size:,}"
    )


def _lstm_shape(config: ModelConfig) -> str:
    return (
        f"{config.n_layer} layers, embedding {config.n_embd}, hidden {config.hidden_size}, "
        f"vocabulary {config.vocab_size:,}"
    )


KINDS: dict[str, ModelKind] = {
    "gpt": ModelKind(
        GPT, _transformer_family, _transformer_shape, lambda c: c.block_size, KVCacheBackend, grow=vocab.grow_to
    ),
    "lstm": ModelKind(LSTM, lambda c: "LSTM", _lstm_shape, lambda c: None, RecurrentBackend, grow=None),
}
assert tuple(KINDS) == MODEL_KINDS, "every kind config.py accepts has an entry here, and no other"


def kind_of(config: ModelConfig) -> ModelKind:
    return KINDS[config.kind]  # ModelConfig validated the name


def context_limit(model: nn.Module) -> int | None:
    """Most tokens the model attends to at once (None: unlimited, the LSTM carries state)."""
    return kind_of(model.config).context_limit(model.config)


def decode_backend(model: nn.Module, pad_id: int, device: torch.device) -> Any:
    """The decode back-end (prefill / step / keep) that fits the model's kind."""
    return kind_of(model.config).backend(model, pad_id, device)


def grows_vocabulary(config: ModelConfig) -> bool:
    return kind_of(config).grow is not None


def grow_vocabulary(model: nn.Module, tokenizer: Tokenizer, vocab_size: int, *, frozen: bool = False) -> nn.Module:
    """Add rows up to `vocab_size` (the tokenizer's new label tokens), in place. `frozen`: the existing
    table stays frozen and only the new rows train (LoRA). A model already that large is unchanged."""
    kind = kind_of(model.config)
    if vocab_size <= model.config.vocab_size:
        return model
    if kind.grow is None:
        raise AigcError(
            f"a {kind.family(model.config)} model's vocabulary cannot grow (new label tokens); "
            "fine-tune a GPT or drop the labels"
        )
    return kind.grow(model, tokenizer, vocab_size, frozen)


@dataclass(frozen=True)
class ModelSummary:
    """What a model is, for people: the report, the playground, `aigc train` and `aigc serve`."""

    family: str  # "Llama", "GPT-2", "LSTM", or "transformer (norm, positions, mlp)" for other mixes
    shape: str
    parameters: int | None  # total, tied weights once (None: not known)
    trainable: int | None = None  # None: not known or all of them

    def line(self) -> str:
        if self.parameters is None:
            size = "parameters not recorded"
            if self.trainable is not None:
                size = f"{millions(self.trainable)} trainable parameters (total not recorded)"
        else:
            size = f"{millions(self.parameters)} parameters"
            if self.trainable is not None and self.trainable != self.parameters:
                size += f" ({millions(self.trainable)} trainable)"
        return f"{self.family}: {size}; {self.shape}"

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "line": self.line()}


def millions(count: int) -> str:
    return f"{count / 1e6:.2f} M"


def family(config: ModelConfig) -> str:
    """The architecture family: "Llama", "GPT-2", "LSTM", or "transformer (norm, positions, mlp)"."""
    return kind_of(config).family(config)


def describe_config(config: ModelConfig, parameters: int | None, trainable: int | None = None) -> ModelSummary:
    kind = kind_of(config)
    return ModelSummary(kind.family(config), kind.shape(config), parameters, trainable)


def describe_run(config: RunConfig, model: nn.Module | None = None) -> ModelSummary:
    """A run's summary: the counts training recorded (`extra.parameters`: total, trainable), else the
    loaded `model`'s total."""
    counts = config.extra.get("parameters") or {}
    total, trainable = counts.get("total"), counts.get("trainable")
    if total is None and model is not None:
        total = sum(p.numel() for p in model.parameters()) + quantised_weights(model)
    return describe_config(config.model, total, trainable)


def describe(model: nn.Module) -> ModelSummary:
    """The model's summary with its live parameter counts (tied weights once; block-quantised weights,
    which are buffers, counted too)."""
    params = list(model.parameters())  # a shared tensor is yielded once
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return describe_config(model.config, sum(p.numel() for p in params) + quantised_weights(model), trainable)
