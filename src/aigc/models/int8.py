"""Dynamic int8 quantization of the linear layers, for faster and smaller CPU inference.

Each `nn.Linear` weight is stored as int8 with one scale per output row (symmetric, zero point 0);
activations are quantized per batch at run time, so no calibration data is needed. We use
`torch.ao.quantization.quantize_dynamic` with a per-channel config: it is deprecated in favour of
`torchao.quantize_`, but in eager mode on the CPUs we measured it was the fastest of the three
(docs/interop.md): torchao's int8 dynamic path decoded 3x slower than fp32, its weight-only path
1.2x faster, `quantize_dynamic` 1.8x faster. Embeddings, LayerNorms and the LSTM's recurrent weights stay fp32.

The GPT's output head is tied to the token embedding: the head is quantized, and the embedding is
replaced by the dequantized head weight, so the one int8 matrix serves both and is stored once.

An int8 folder is a run folder whose config.json says `weights.format: int8`, whose model.safetensors
holds `NAME.weight` (int8, (out, in)) and `NAME.weight_scale` (fp32, (out,)) per quantized layer.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

# torch.ao's quantize_dynamic is imported by `quantize_int8` alone: it costs start-up for every other caller.
from aigc.artifacts.run import RunConfig
from aigc.errors import AigcError
from aigc.models.build import build_model
from aigc.models.lora import has_lora, merge_lora

SCHEME = {"method": "dynamic-int8", "weights": "per-output-channel symmetric int8", "layers": "nn.Linear"}


def _dynamic_linear_type() -> type:
    return torch.ao.nn.quantized.dynamic.Linear


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with int8 linear layers (LoRA adapters folded in first); `model` is unchanged."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic  # slow import, see top

    model = copy.deepcopy(model).float().eval()
    if has_lora(model):
        merge_lora(model)
    with warnings.catch_warnings():  # the deprecation notice is about the API's future, see module doc
        warnings.simplefilter("ignore")
        quantized = quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    if _tied(quantized):
        int8, scale = _int8_weight(quantized.lm_head)
        with torch.no_grad():
            quantized.wte.weight.copy_(int8.float() * scale.unsqueeze(1))  # (V, C) = dequantized head
    return quantized.eval()


def _tied(model: nn.Module) -> bool:
    """Whether the GPT's output head shares the token embedding (an untied head keeps its own)."""
    config = getattr(model, "config", None)
    return hasattr(model, "wte") and hasattr(model, "lm_head") and getattr(config, "tie_embeddings", True)


def _int8_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight (out, in), fp32 scale (out,)) of a dynamically quantized linear layer."""
    qweight = module.weight()
    if qweight.qscheme() not in (torch.per_channel_symmetric, torch.per_channel_affine):
        raise AssertionError(f"expected a per-channel quantized weight, got {qweight.qscheme()}")
    assert bool((qweight.q_per_channel_zero_points() == 0).all()), "symmetric int8 has zero points of 0"
    return qweight.int_repr(), qweight.q_per_channel_scales().float()


def int8_state(quantized: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors (int8 + scales + fp32) that describe a quantized model completely."""
    qtype = _dynamic_linear_type()
    tensors: dict[str, torch.Tensor] = {}
    for name, module in quantized.named_modules():
        if isinstance(module, qtype):
            int8, scale = _int8_weight(module)
            tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"] = int8.contiguous(), scale.contiguous()
            if module.bias() is not None:
                tensors[f"{name}.bias"] = module.bias().detach().float().contiguous()
    tied = _tied(quantized)
    for name, param in quantized.named_parameters():  # quantized layers have none: the fp32 rest
        if not (tied and name == "wte.weight"):
            tensors[name] = param.detach().float().contiguous()
    return tensors


def load_int8_state(quantized: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Fill a quantized model (from `quantize_int8` of any same-shaped model) with `int8_state` tensors."""
    qtype = _dynamic_linear_type()
    used: set[str] = set()
    try:
        for name, module in quantized.named_modules():
            if isinstance(module, qtype):
                int8, scale = tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"]
                zero = torch.zeros(scale.shape, dtype=torch.long)
                qweight = torch._make_per_channel_quantized_tensor(int8, scale.double(), zero, 0)
                bias = tensors.get(f"{name}.bias")
                module.set_weight_bias(qweight, bias)
                used |= {f"{name}.weight", f"{name}.weight_scale", f"{name}.bias"}
        with torch.no_grad():
            for name, param in quantized.named_parameters():
                if name == "wte.weight" and _tied(quantized):
                    int8, scale = tensors["lm_head.weight"], tensors["lm_head.weight_scale"]
                    param.copy_(int8.float() * scale.unsqueeze(1))
                else:
                    param.copy_(tensors[name])
                    used.add(name)
    except (KeyError, RuntimeError) as exc:
        raise AigcError(
            f"int8 weights {source} do not match the model in config.json ({exc}); re-export the run"
        ) from exc
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise AigcError(f"int8 weights {source} hold tensors this model lacks ({unexpected[:3]}); re-export the run")


def load_int8_model(config: RunConfig, weights: str | os.PathLike) -> nn.Module:
    """The quantized model of an int8 run folder (the registered loader of weights format "int8")."""
    scheme = config.weights.quantization or {}
    if scheme.get("method") != SCHEME["method"]:
        raise AigcError(f"unknown quantization {scheme}; aigc reads {SCHEME['method']} only")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise AigcError(f"int8 weights {weights} are corrupted ({exc}); re-export the run") from exc
    quantized = quantize_int8(build_model(config.model))
    load_int8_state(quantized, tensors, str(weights))
    return quantized.eval()
