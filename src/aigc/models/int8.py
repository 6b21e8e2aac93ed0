"""int8 linear layers with per-token activation scales, for faster and smaller CPU inference.

Each `nn.Linear` becomes an `Int8Linear`: its weight is stored as int8 with one fp32 scale per output
row (symmetric, zero point 0). At run time every row of the input (one token) is quantized to int8 with
its own scale (absmax / 127), the int8 x int8 product is accumulated in int32 by `torch._int_mm`, and
the result is rescaled by (token scale x row scale). No calibration data is needed.

Why per token: Llama-family models carry "massive activations" (Sun et al. 2024, arXiv:2402.17762): on
SmolLM2-135M the input of `h.11.mlp.c_proj` reaches 2,490 on the first token while other tokens stay
near 1. `torch.ao`'s dynamic quantization (our first int8 path, method "dynamic-int8") used ONE scale
for the whole (batch x time, in) input, which rounded every other token of the prompt to 0 there:
greedy tokens matched fp32 at 0.8 % of positions. One scale per token confines an outlier to its token
(docs/benchmarks.md, "int8 on the pretrained base").

One token at a time (batch-1 decoding), a per-call scale IS a per-token scale, and fbgemm's dynamic
int8 kernel (`quantized::linear_dynamic`, asymmetric 7-bit activations) decoded SmolLM2 1.65x faster
than `torch._int_mm`, so a layer fed one token uses it. A row's result therefore depends on whether it
is decoded alone or in a batch (by int8 rounding only). Where `torch._int_mm` is missing, the same
integers go through a float matmul (`Int8Linear.fast = False` forces that path for every input; the
tests check the three paths agree). Embeddings, norms and the LSTM's recurrent weights stay fp32.

The GPT's output head is tied to the token embedding: the head is quantized, and the embedding is
replaced by the dequantized head weight, so the one int8 matrix serves both and is stored once.

An int8 folder is a run folder whose config.json says `weights.format: int8`, whose model.safetensors
holds `NAME.weight` (int8, (out, in)) and `NAME.weight_scale` (fp32, (out,)) per quantized layer. Folders
written by the old "dynamic-int8" method hold the same tensors and load into the per-token layers.
"""

from __future__ import annotations

import copy
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file

from aigc.artifacts.run import RunConfig
from aigc.errors import AigcError
from aigc.models.build import build_model
from aigc.models.lora import has_lora, merge_lora

SCHEME = {
    "method": "int8-per-token",
    "weights": "per-output-channel symmetric int8",
    "activations": "int8, one symmetric scale per token",
    "layers": "nn.Linear",
}
# Methods whose stored tensors (int8 weight + weight_scale per layer) this module reads.
READABLE_METHODS = ("int8-per-token", "dynamic-int8")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 (out, in), fp32 scale (out,)) of a float weight (out, in): symmetric, one scale per row."""
    scale = weight.detach().float().abs().amax(dim=1).clamp_min(1e-12) / 127.0  # (out,)
    int8 = torch.round(weight.detach().float() / scale.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return int8, scale


class Int8Linear(nn.Module):
    """y = x W^T + b with W int8 (out, in) x per-row scales and x quantized to int8 per token."""

    fast = hasattr(torch, "_int_mm")  # class-wide switch; False = the float fallback
    one_token_kernel = "fbgemm" in torch.backends.quantized.supported_engines  # x86 builds have it

    def __init__(self, int8: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = int8.shape
        self.register_buffer("weight", int8.contiguous())  # (out, in) int8
        self.register_buffer("weight_scale", scale.float().contiguous())  # (out,)
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None
        self._packed = self._pack()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        int8, scale = quantize_weight(linear.weight)
        return cls(int8, scale, linear.bias)

    def set_weight(self, int8: torch.Tensor, scale: torch.Tensor) -> None:
        if int8.shape != self.weight.shape or int8.dtype != torch.int8 or scale.shape != self.weight_scale.shape:
            raise RuntimeError(f"expected int8 {tuple(self.weight.shape)}, got {int8.dtype} {tuple(int8.shape)}")
        self.weight.copy_(int8)
        self.weight_scale.copy_(scale.float())
        self._packed = self._pack()

    def _pack(self):
        """fbgemm's prepacked copy of the weight for single-token inputs, or None. Filled from the buffers
        here and in `set_weight` only: write the weight through `set_weight`, never in place."""
        if not self.one_token_kernel:
            return None
        zero = torch.zeros(self.out_features, dtype=torch.long)
        with warnings.catch_warnings():  # quantized tensors are deprecated; the packed kernel is what we use
            warnings.simplefilter("ignore")
            qweight = torch._make_per_channel_quantized_tensor(self.weight, self.weight_scale.double(), zero, 0)
            return torch.ops.quantized.linear_prepack(qweight, None)  # bias added in forward: it may be reloaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()  # (M, in), M = batch x time
        if self.fast and rows.shape[0] == 1 and self._packed is not None:
            y = torch.ops.quantized.linear_dynamic(rows, self._packed, True)  # (1, out); True: 7-bit range
        else:
            x_scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0  # (M, 1)
            q = torch.round(rows / x_scale).to(torch.int8)  # |rows / x_scale| <= 127 by construction
            if self.fast:
                # (M, out) exact int32 sums; the transposed view (column-major (in, out)) ran 2.5x faster at
                # M = 1 than a contiguous (in, out) copy on AVX-512
                acc = torch._int_mm(q, self.weight.t()).float()
            else:
                acc = F.linear(q.float(), self.weight.float())  # the same integer sums, in float
            y = acc * x_scale * self.weight_scale  # (M, out)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_int8(model: nn.Module) -> nn.Module:
    """A copy of `model` with int8 linear layers (LoRA adapters folded in first); `model` is unchanged."""
    model = copy.deepcopy(model).float().eval()
    if has_lora(model):
        merge_lora(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, Int8Linear.from_linear(module))
    if _tied(model):
        with torch.no_grad():
            model.wte.weight = nn.Parameter(_dequantized(model.lm_head), requires_grad=False)  # (V, C)
    return model.eval()


def _dequantized(layer: Int8Linear) -> torch.Tensor:
    return layer.weight.float() * layer.weight_scale.unsqueeze(1)


def _tied(model: nn.Module) -> bool:
    """Whether the GPT's output head shares the token embedding (an untied head keeps its own)."""
    config = getattr(model, "config", None)
    return hasattr(model, "wte") and hasattr(model, "lm_head") and getattr(config, "tie_embeddings", True)


def int8_state(quantized: nn.Module) -> dict[str, torch.Tensor]:
    """Plain tensors (int8 + scales + fp32) that describe a quantized model completely."""
    tensors: dict[str, torch.Tensor] = {}
    for name, module in quantized.named_modules():
        if isinstance(module, Int8Linear):
            tensors[f"{name}.weight"] = module.weight.contiguous()
            tensors[f"{name}.weight_scale"] = module.weight_scale.contiguous()
    tied = _tied(quantized)
    for name, param in quantized.named_parameters():  # biases of int8 layers, and the fp32 rest
        if not (tied and name == "wte.weight"):
            tensors[name] = param.detach().float().contiguous()
    return tensors


def load_int8_state(quantized: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Fill a quantized model (from `quantize_int8` of any same-shaped model) with `int8_state` tensors."""
    used: set[str] = set()
    try:
        with torch.no_grad():
            for name, module in quantized.named_modules():
                if isinstance(module, Int8Linear):
                    module.set_weight(tensors[f"{name}.weight"], tensors[f"{name}.weight_scale"])
                    used |= {f"{name}.weight", f"{name}.weight_scale"}
            for name, param in quantized.named_parameters():
                if name == "wte.weight" and _tied(quantized):
                    param.copy_(_dequantized(quantized.lm_head))
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
    if scheme.get("method") not in READABLE_METHODS:
        raise AigcError(f"unknown quantization {scheme}; aigc reads {', '.join(READABLE_METHODS)}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise AigcError(f"int8 weights {weights} are corrupted ({exc}); re-export the run") from exc
    quantized = quantize_int8(build_model(config.model))
    load_int8_state(quantized, tensors, str(weights))
    return quantized.eval()
