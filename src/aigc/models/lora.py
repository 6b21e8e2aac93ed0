"""Low-rank adapters (LoRA, Hu et al. 2021) for the linear layers of our models.

A wrapped layer computes `W x + b + (alpha / r) · B A x`, with the base `W`, `b` frozen, `A` (r, in)
initialised like a linear layer and `B` (out, r) zero, so training starts from the base model exactly.

We use this small implementation rather than `peft`: `peft` can wrap our modules, but it imports
`transformers` (≈6 s here) on every load of a LoRA run, lives in the optional `hf` extra, and renames
every weight (`base_model.model.…base_layer.weight`), which every reader of a run would have to undo.
Here a wrapped layer keeps the parameter names `weight` and `bias`, so a LoRA run's safetensors file
is the base weights plus `….lora_A` / `….lora_B` tensors, and merging only drops those.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from aigc.config import LORA_TARGETS, TrainConfig
from aigc.errors import AigcError
from aigc.fsutil import write_with
from aigc.models import fused, vocab
from aigc.models.packed import Linear
from aigc.models.qlayers import QuantEmbedding, QuantLinear, expand_quantised, quantised_weights

DEFAULT_TARGETS = LORA_TARGETS


@dataclass(frozen=True)
class LoRASpec:
    """Where and how big the adapters are; stored in the run's config.json under `extra.lora`."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise AigcError(f"--lora-rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise AigcError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise AigcError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise AigcError("--lora-targets is empty; name at least one linear layer, e.g. c_attn")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "targets": list(self.targets), "dropout": self.dropout}

    @classmethod
    def from_json(cls, obj: dict) -> LoRASpec:
        return cls(int(obj["rank"]), float(obj["alpha"]), tuple(obj["targets"]), float(obj.get("dropout", 0.0)))


def spec_from_config(config: TrainConfig) -> LoRASpec | None:
    """The LoRA settings of `aigc train`, or None when `--lora-rank` is 0 (full fine-tuning)."""
    if config.lora_rank == 0:
        return None
    return LoRASpec(config.lora_rank, config.lora_alpha, split_targets(config.lora_targets), config.lora_dropout)


def split_targets(values: Iterable[str]) -> tuple[str, ...]:
    """`["c_attn,c_proj", "c_fc"]` -> `("c_attn", "c_proj", "c_fc")` (the flag takes both forms)."""
    names = [name.strip() for value in values for name in value.split(",")]
    return tuple(dict.fromkeys(name for name in names if name))


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update; same `weight`/`bias` names as nn.Linear."""

    def __init__(self, base: nn.Linear, spec: LoRASpec):
        super().__init__()
        self.weight = base.weight  # (out, in), frozen
        self.bias = base.bias  # (out,) or None, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._add_adapters(base, spec, self.weight.device)

    def _add_adapters(self, base: nn.Module, spec: LoRASpec, device: torch.device) -> None:
        self.in_features, self.out_features = base.in_features, base.out_features
        factory = dict(device=device, dtype=torch.float32 if isinstance(base, QuantLinear) else base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(spec.rank, self.in_features, **factory))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, spec.rank, **factory))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scaling = spec.scaling
        self.dropout = nn.Dropout(spec.dropout)
        self.fused = True  # `fused.lora_linear` while training (see `GPT.set_fused_training`)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer's output (..., out)."""
        return F.linear(x, self.weight, self.bias)

    def one_function(self) -> bool:
        """Whether `fused.lora_linear` can take this layer: a frozen float base weight (and bias)."""
        return not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused and not self.dropout.p and torch.is_grad_enabled() and self.one_function():
            return fused.lora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, self.scaling)
        # The adapters in x's dtype: a base held in bf16 (`hold_frozen_in`) gets bf16 inputs even
        # outside autocast (e.g. samples drawn during training); under autocast this is its own cast.
        lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        low = F.linear(self.dropout(x) if self.dropout.p else x, lora_A)  # (..., r)
        base = self.frozen(x)  # (..., out)
        # base + scaling * low B^T in one product that accumulates onto base (no separate scale and add).
        rows = torch.addmm(
            base.reshape(-1, self.out_features), low.reshape(-1, low.shape[-1]), lora_B.t(), alpha=self.scaling
        )  # (N, out)
        return rows.view(*x.shape[:-1], self.out_features)

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)  # (out, in)

    def merged(self) -> Linear:
        """A plain linear layer (`aigc.models.packed.Linear`) whose weight already contains the update."""
        linear = Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class QuantLoRALinear(LoRALinear):
    """LoRA over a frozen block-quantised layer (QLoRA, Dettmers et al. 2023): the adapters train in
    float32 and compute in x's dtype, as over a float base; the base product is the `QuantLinear`'s
    (its blocks expanded per call, never stored expanded: `qgrad`). The layer is held as `base`."""

    def __init__(self, base: QuantLinear, spec: LoRASpec):
        nn.Module.__init__(self)
        self.base = base
        self.bias = None  # the base adds its own
        self._add_adapters(base, spec, base.weight_0.device)

    def frozen(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x)

    def one_function(self) -> bool:
        return False  # the base product is the blocks' own (`qgrad`), not a float weight's

    def merged(self) -> Linear:
        """A float32 linear layer: the expanded blocks plus the update (a dequantise-merge)."""
        linear = Linear(self.in_features, self.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.base.dequantized() + self.delta_weight())
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear


LINEAR_TYPES = (nn.Linear, QuantLinear)  # what adapters can wrap: float or block-quantised layers


def linear_names(model: nn.Module) -> list[str]:
    """Short names (last path component) of the model's linear layers that LoRA may target."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)})


def apply_lora(model: nn.Module, spec: LoRASpec) -> nn.Module:
    """Freeze every parameter of `model` and wrap the targeted linear layers with adapters, in place."""
    if has_lora(model):
        raise AigcError("this model already has LoRA adapters; merge them first with `aigc merge RUN`")
    linears = [name for name, m in model.named_modules() if isinstance(m, LINEAR_TYPES)]
    unknown = [t for t in spec.targets if not any(_matches(name, t) for name in linears)]
    if unknown:
        available = ", ".join(linear_names(model))
        raise AigcError(f"--lora-targets {','.join(unknown)} not found; this model's linear layers: {available}")
    for param in model.parameters():
        param.requires_grad_(False)
    for name in linears:
        module = model.get_submodule(name)
        if any(_matches(name, t) for t in spec.targets):
            if _tied_to_embedding(model, module):
                raise AigcError(f"--lora-targets {name} is tied to the token embedding; target the block layers")
            wrapped = QuantLoRALinear(module, spec) if isinstance(module, QuantLinear) else LoRALinear(module, spec)
            _set_module(model, name, wrapped)
    return model


def hold_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every frozen parameter in `dtype` (e.g. bf16 for bf16 training), in place, so that no
    step casts the base again; trainable ones keep their precision. Returns how many were cast.

    Measured on SmolLM2-135M LoRA, batch 4 x 128, 2-core AMX Xeon: +13 % tokens/s over autocast's
    per-step casts of the fp32 base, and 270 MB less memory (docs/benchmarks.md). A quantised table
    keeps its blocks and gives its rows in `dtype`."""
    cast = 0
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    for module in model.modules():
        if isinstance(module, QuantEmbedding):
            module.dtype = dtype
    return cast


def _tied_to_embedding(model: nn.Module, module: nn.Module) -> bool:
    wte = getattr(model, "wte", None)
    if isinstance(module, QuantLinear):
        return module.shares_blocks(wte)
    return wte is not None and getattr(wte, "weight", None) is module.weight


def _matches(module_name: str, target: str) -> bool:
    """`c_proj` matches every `….c_proj`; a dotted target such as `attn.c_proj` narrows it down."""
    return module_name == target or module_name.endswith("." + target)


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain nn.Linear layers, in place. Over a
    quantised base the result is float32 throughout: the expanded blocks plus the updates (grown
    tables folded, the other quantised layers expanded), a plain run that every exporter takes."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            _set_module(model, name, module.merged())
    if quantised_weights(model):
        expand_quantised(vocab.fold(model))
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters (tied weights counted once)."""
    params = list(model.parameters())  # nn.Module.parameters() already yields a shared tensor once
    total = sum(p.numel() for p in params) + quantised_weights(model)  # block-quantised weights are buffers
    return {"trainable": sum(p.numel() for p in params if p.requires_grad), "total": total}


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if ".lora_" in name}


def save_adapters(model: nn.Module, spec: LoRASpec, path: str | os.PathLike) -> None:
    """Write only the adapter tensors (small: shareable apart from the base run), atomically."""
    state = adapter_state(model)
    if not state:
        raise AigcError("the model has no LoRA adapters to save")
    metadata = {"aigc_lora": json.dumps(spec.to_json())}
    write_with(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def load_adapters(model: nn.Module, path: str | os.PathLike) -> LoRASpec:
    """Apply the adapters saved by `save_adapters` to a base model, in place; returns their spec."""
    try:
        with safe_open(str(path), framework="pt") as f:
            spec = LoRASpec.from_json(json.loads((f.metadata() or {})["aigc_lora"]))
            state = {key: f.get_tensor(key) for key in f.keys()}
    except (OSError, KeyError, ValueError) as exc:
        raise AigcError(f"{path} is not an aigc adapter file ({exc}); save one with `aigc merge`") from exc
    apply_lora(model, spec)
    missing, unexpected = model.load_state_dict(state, strict=False)
    lora_missing = [key for key in missing if ".lora_" in key]
    if unexpected or lora_missing:
        raise AigcError(
            f"adapters in {path} do not fit this model (unexpected {unexpected[:3]}, missing {lora_missing[:3]})"
        )
    return spec


def _set_module(model: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
