"""`aigc export RUN --format q8_0|q4_0|q4_1|q5_0|q5_1` (`q4` = q4_0): a quantised run made from an
fp32 run, in the block layout `aigc import FILE.gguf` keeps (models/qlinear.py), so the same
kernels compute with it.

Blocks come from `gguf.quants.quantize`, llama.cpp's reference quantiser in Python. It writes the
five 32-weight types, not the K-quants, so those are the formats offered here.

As llama.cpp does for small models, the embedding table is not quantised as coarsely as the rest:
a 4- or 5-bit export keeps it (and the output head, which a tied model shares with it) in Q8_0,
the finest type gguf writes (llama.cpp's own choice for the output head is Q6_K, which gguf's
Python quantiser does not write). A layer whose width is not a multiple of 32 stays float32.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn
from gguf import GGMLQuantizationType
from gguf.quants import quantize

from aigc.artifacts.run import (
    CHAT_TEMPLATE,
    METRICS,
    TOKENIZER,
    WEIGHTS,
    Run,
    Weights,
    prepare_out_dir,
    require_plain_weights,
    save_config,
)
from aigc.errors import AigcError
from aigc.interop.gguf_blocks import stored_types
from aigc.models.gpt import GPT
from aigc.models.kinds import family
from aigc.models.lora import has_lora, merge_lora
from aigc.models.qblocks import TYPES
from aigc.models.qlinear import Part, save_quantised

FORMATS = {"q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4": "Q4_0"}
TABLE_TYPE = "Q8_0"  # the embedding and the output head


def _blocks(weight: torch.Tensor, type_name: str) -> Part:
    """(rows, cols) float weight -> a Part of `type_name` blocks (float32 when the width does not fit)."""
    rows, cols = weight.shape
    weight = weight.detach().float().contiguous()
    if cols % TYPES[type_name].block:
        return Part("F32", weight, rows, cols)
    data = quantize(weight.numpy(), GGMLQuantizationType[type_name])  # (rows, row_bytes) uint8
    return Part(type_name, torch.from_numpy(data), rows, cols)


def quantised_layers(model: nn.Module, type_name: str) -> tuple[dict[str, list[Part]], dict[str, torch.Tensor]]:
    """(layers, float32 tensors) of a GPT: every linear layer in `type_name`, the tables in Q8_0."""
    tied = model.config.tie_embeddings
    layers = {"wte": [_blocks(model.wte.weight, TABLE_TYPE)]}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name != "lm_head":
            layers[name] = [_blocks(module.weight, type_name)]
    if not tied:
        layers["lm_head"] = [_blocks(model.lm_head.weight, TABLE_TYPE)]
    quantised = {f"{name}.weight" for name in layers} | {"lm_head.weight"}
    plain = {n: t.detach().float() for n, t in model.state_dict().items() if n not in quantised}
    return layers, plain


def export_quantised(run: Run, out_dir: str | os.PathLike, *, format: str, overwrite: bool = False) -> Path:
    """Write a quantised run folder of `run` (an fp32 or LoRA run; adapters are merged first)."""
    if format not in FORMATS:
        raise AigcError(f"unknown quantised format {format!r}; choose one of {', '.join(FORMATS)}")
    if run.config.weights.format in ("int8", "quantized"):
        require_plain_weights(run.config, run.path, "quantised export", verb="export")
    if not isinstance(run.model, GPT):  # the block layout is that of a transformer's linear layers
        raise AigcError(f"quantised export needs a transformer run; {run.path} is {family(run.config.model)}")
    out = prepare_out_dir(out_dir, overwrite=overwrite)
    model = run.model
    if has_lora(model):
        model = merge_lora(copy.deepcopy(model))
    layers, plain = quantised_layers(model, FORMATS[format])
    extra = dict(run.config.extra)
    if run.config.weights.lora is not None:
        extra["merged_lora"] = run.config.weights.lora
    quantization = {"method": "gguf-blocks", "weights_by_type": stored_types(layers), "source": str(run.path.resolve())}
    config = dataclasses.replace(
        run.config, weights=Weights(format="quantized", quantization=quantization), extra=extra
    )
    save_quantised(out / WEIGHTS, layers, plain)
    run.tokenizer.save(out / TOKENIZER)
    for name in (METRICS, CHAT_TEMPLATE):
        if (run.path / name).is_file():
            shutil.copyfile(run.path / name, out / name)
    save_config(out, config)
    return out
