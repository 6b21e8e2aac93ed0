"""The built-in weight loaders, registered with `aigc.artifacts.registry` when `aigc.models` is imported.

full: build the model of config.json and fill it. lora: the base run named in config.json plus the
stored adapters (`adapted.py`); runs written before adapters were stored apart hold the base too.
int8: see `int8.py`. quantized: GGML blocks kept as they are (`qlinear.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from aigc.artifacts.registry import register_weights_loader
from aigc.artifacts.run import RunConfig, load_weights
from aigc.models.adapted import load_lora_run
from aigc.models.build import build_model
from aigc.models.int8 import load_int8_model
from aigc.models.lora import LoRASpec, apply_lora
from aigc.models.qlinear import load_quantised_model


def load_full(config: RunConfig, weights: Path) -> nn.Module:
    model = build_model(config.model)
    load_weights(model, weights)
    return model


def load_lora(config: RunConfig, weights: Path) -> nn.Module:
    if config.weights.base is not None:
        return load_lora_run(config, weights)
    model = build_model(config.model)  # an older LoRA run: base weights and adapters in one file
    apply_lora(model, LoRASpec.from_json(config.weights.lora))  # the adapters are in the weights file too
    load_weights(model, weights)
    return model


register_weights_loader("full", load_full)
register_weights_loader("lora", load_lora)
register_weights_loader("int8", load_int8_model)
register_weights_loader("quantized", load_quantised_model)
