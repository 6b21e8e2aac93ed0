"""A GGUF file's weights as a quantised run's layers, the blocks kept as they are (`aigc import FILE.gguf`).

Why a safetensors file of the blocks rather than the GGUF file itself in the run: the run stays one
self-contained folder in the one weights format every run uses, the layout work is done once here
instead of at every load (q/k/v fused into `attn.c_attn` and gate/up into `mlp.c_fc` by stacking
rows; llama.cpp's Q/K row order undone by moving whole rows of blocks, which is exact), and the
file maps into memory as directly as the GGUF does (`models/qlinear.read_mapped`). The folder is
the size of the GGUF's tensor data plus the tokenizer: 1.0x the file.

Types the kernels compute with (`qblocks.QUANTISED`) are copied byte for byte. Float tensors (F32,
F16, BF16: norms, and whatever a file keeps unquantised) and the types without kernels (Q2_K,
Q3_K) become float32 parts, expanded by `gguf.quants.dequantize`.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from aigc.config import ModelConfig
from aigc.errors import AigcError
from aigc.interop.gguf import ARCHITECTURES, GGUFModel, hf_tensor_name, unpermute_rows
from aigc.models.qblocks import QUANTISED, TYPES, dequantize
from aigc.models.qlinear import Part

FUSED = {
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
}
LINEAR = {"attn.c_proj": "self_attn.o_proj", "mlp.c_proj": "mlp.down_proj"}
NORMS = {"ln_1.weight": "input_layernorm.weight", "ln_2.weight": "post_attention_layernorm.weight"}


def _part(tensor, heads: int) -> Part:
    """One GGUF tensor as a Part, rows in transformers' order (`heads` > 0: undo llama.cpp's Q/K order)."""
    rows, cols = (int(d) for d in reversed(tensor.shape))
    kind = tensor.tensor_type.name
    if kind in QUANTISED:
        data = torch.from_numpy(np.array(tensor.data)).reshape(-1)  # the tensor's bytes, as the reader cut them
        row_bytes = TYPES[kind].row_bytes(cols)
        if cols % TYPES[kind].block or data.numel() != rows * row_bytes:
            raise AigcError(f"tensor {tensor.name}: {data.numel()} bytes are not {rows} x {cols} {kind} weights")
        data = data.view(rows, row_bytes)  # (rows, row_bytes) uint8
    else:
        data = torch.from_numpy(np.array(gguf_dequantize(tensor.data, tensor.tensor_type), np.float32))
        data, kind = data.reshape(rows, cols), "F32"
    if heads:
        order = unpermute_rows(torch.arange(rows).unsqueeze(1), heads).squeeze(1)  # file row of each row
        data = data[order]
    return Part(kind, data, rows, cols)


def _merged(parts: list[Part]) -> list[Part]:
    """Consecutive parts of one type stacked into one (fewer kernel calls per layer)."""
    out: list[Part] = []
    for part in parts:
        if out and out[-1].type == part.type:
            last = out.pop()
            part = Part(part.type, torch.cat((last.data, part.data)), last.rows + part.rows, part.cols)
        out.append(part)
    return out


def _float(tensor) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf_dequantize(tensor.data, tensor.tensor_type), np.float32)).reshape(-1)


def block_layers(
    model: GGUFModel, reader: GGUFReader, config: ModelConfig
) -> tuple[dict[str, list[Part]], dict[str, torch.Tensor]]:
    """(quantised layers by our module names, float32 tensors by our names) of an opened GGUF."""
    by_hf = {hf_tensor_name(t.name): t for t in reader.tensors}
    permuted = ARCHITECTURES[model.source["architecture"]][3]
    heads = {"self_attn.q_proj": config.n_head, "self_attn.k_proj": config.kv_heads} if permuted else {}
    layers = {"wte": [_part(by_hf["model.embed_tokens.weight"], 0)]}
    if "lm_head.weight" in by_hf:
        layers["lm_head"] = [_part(by_hf["lm_head.weight"], 0)]
    plain = {"ln_f.weight": _float(by_hf["model.norm.weight"])}
    for i in range(config.n_layer):
        theirs, ours = f"model.layers.{i}.", f"h.{i}."
        for name, parts in FUSED.items():
            layers[ours + name] = _merged([_part(by_hf[f"{theirs}{p}.weight"], heads.get(p, 0)) for p in parts])
            biases = [by_hf.get(f"{theirs}{p}.bias") for p in parts]
            if all(b is not None for b in biases):
                plain[f"{ours}{name}.bias"] = torch.cat([_float(b) for b in biases])
        for name, part in LINEAR.items():
            layers[ours + name] = [_part(by_hf[f"{theirs}{part}.weight"], 0)]
        for name, norm in NORMS.items():
            plain[ours + name] = _float(by_hf[theirs + norm])
    return layers, plain


def add_rows(parts: list[Part], count: int) -> list[Part]:
    """`count` new float32 rows after `parts`, each the mean of the existing rows (a new token is then
    never likelier than average: see `pretrained._grow_vocabulary`). Expanded one part at a time."""
    if count <= 0:
        return parts
    cols = parts[0].cols
    total = sum(dequantize(p.data, p.type, cols).double().sum(0) for p in parts)
    mean = (total / sum(p.rows for p in parts)).float().unsqueeze(0).expand(count, cols).contiguous()
    return [*parts, Part("F32", mean, count, cols)]


def holds_blocks(reader: GGUFReader) -> bool:
    """Whether any tensor of the file is of a block type aigc computes with (an F32/F16/BF16 file has
    none: it is imported as an fp32 run, since there is nothing quantised to keep)."""
    return any(tensor.tensor_type.name in QUANTISED for tensor in reader.tensors)


def stored_types(layers: dict[str, list[Part]]) -> dict[str, int]:
    """How many weights of each type the layers hold (for config.json and `aigc import`'s message)."""
    counts: dict[str, int] = {}
    for parts in layers.values():
        for part in parts:
            counts[part.type] = counts.get(part.type, 0) + part.rows * part.cols
    if not any(name in QUANTISED for name in counts):
        raise AigcError("the file holds no weights of a type aigc computes with; import it with --dequantize")
    return counts
