"""The weights file of a quantised run, and its loader (the layers are `qlayers.py`).

A quantised run (`weights.format: quantized` in config.json) keeps GGUF's blocks as they are: its
model.safetensors holds, for each quantised layer NAME, the parts `NAME.weight.0`, `NAME.weight.1`,
... (row ranges of the logical (out, in) weight, each uint8 blocks of one GGML type, or float32),
and every other tensor (norms, biases) as float32 under its usual name. The header's metadata
`aigc.layers` records each part's type and logical shape: {NAME: [[type, rows, cols], ...]}.
Parts exist because a fused layer (q/k/v in `attn.c_attn`, gate/up in `mlp.c_fc`) may hold
weights of different types: GGUF files of the "_M" mixes give attn_v more bits than attn_q.

Loading maps the file into memory (`read_mapped`) and wraps each layer's parts in a `QuantLinear`
(or `QuantEmbedding` for the token table), so nothing float32-sized is materialised.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from aigc.artifacts.run import RunConfig
from aigc.errors import AigcError
from aigc.fsutil import write_with
from aigc.models.build import build_model
from aigc.models.qblocks import check_blocks
from aigc.models.qlayers import Part, QuantEmbedding, QuantLinear

__all__ = ["Part", "QuantEmbedding", "QuantLinear", "load_quantised_model", "read_mapped", "save_quantised"]

LAYOUT_KEY = "aigc.layers"
FILE_FORMAT = "aigc-gguf-blocks"


# -------------------------------------------------------------------------------------------------
# The weights file
# -------------------------------------------------------------------------------------------------

_DTYPES = {"U8": np.uint8, "I8": np.int8, "F32": np.float32, "F16": np.float16}


def read_mapped(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, the tensors views of one copy-on-write memory map.

    Read here rather than with `safetensors.safe_open`, whose `get_tensor` copies each tensor into
    memory: the point of a quantised run is that its weights are paged in from the file, not copied.
    The header is checked against the file's size, so a truncated file is refused, not read past."""
    path = Path(path)
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if not 0 < length <= size - 8:
                raise ValueError(f"header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        meta = header.pop("__metadata__", None) or {}
        start = 8 + length
        mapped = np.memmap(path, dtype=np.uint8, mode="c", offset=start) if size > start else np.zeros(0, np.uint8)
        tensors = {name: _view(mapped, name, info) for name, info in header.items()}
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise AigcError(
            f"weights file {path} is corrupted or truncated ({exc}); import or export the run again"
        ) from exc
    return tensors, meta


def _view(mapped: np.ndarray, name: str, info: dict) -> torch.Tensor:
    dtype, shape = np.dtype(_DTYPES[info["dtype"]]), tuple(int(d) for d in info["shape"])
    begin, end = (int(v) for v in info["data_offsets"])
    if not 0 <= begin <= end <= mapped.size or end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"tensor {name} lies outside the file or has the wrong size")
    array = mapped[begin:end]
    if begin % dtype.itemsize:  # safetensors aligns tensors; copy one that is not rather than misread it
        array = np.array(array)
    return torch.from_numpy(array.view(dtype).reshape(shape))


def save_quantised(path: str | os.PathLike, layers: dict[str, list[Part]], plain: dict[str, torch.Tensor]) -> None:
    """Write the weights file of a quantised run atomically (layout in the module docstring)."""
    tensors = {name: t.contiguous() for name, t in plain.items()}
    layout = {}
    for name, parts in layers.items():
        layout[name] = [[p.type, p.rows, p.cols] for p in parts]
        for i, part in enumerate(parts):
            check_blocks(part.data, part.type, part.rows, part.cols, f"{name} part {i}")
            tensors[f"{name}.weight.{i}"] = part.data.contiguous()
    metadata = {"format": FILE_FORMAT, LAYOUT_KEY: json.dumps(layout)}
    write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _parts(name: str, spec, tensors: dict[str, torch.Tensor], where: str) -> list[Part]:
    if not isinstance(spec, list) or not spec:
        raise AigcError(f"{where}: the layout of {name} is not a list of parts; the file was edited")
    parts = []
    for i, entry in enumerate(spec):
        if not (isinstance(entry, list) and len(entry) == 3 and all(isinstance(v, int) for v in entry[1:])):
            raise AigcError(f"{where}: part {i} of {name} is not [type, rows, cols]; the file was edited")
        data = tensors.pop(f"{name}.weight.{i}", None)
        if data is None:
            raise AigcError(f"{where}: {name}.weight.{i} is missing; import or export the run again")
        check_blocks(data, str(entry[0]), entry[1], entry[2], f"{where}: {name} part {i}")
        parts.append(Part(str(entry[0]), data, entry[1], entry[2]))
    if len({p.cols for p in parts}) != 1:
        raise AigcError(f"{where}: the parts of {name} have different widths")
    return parts


def load_quantised_model(config: RunConfig, weights: Path) -> nn.Module:
    """The model of a quantised run, its weights mapped from `weights` (the loader of format "quantized")."""
    if config.model.kind != "gpt":
        raise AigcError(f"quantised weights need a GPT model, not {config.model.kind!r}")
    tensors, meta = read_mapped(weights)
    try:
        layout = json.loads(meta[LAYOUT_KEY])
    except (KeyError, json.JSONDecodeError) as exc:
        raise AigcError(
            f"{weights} has no readable {LAYOUT_KEY} metadata; it is not a quantised run's weights"
        ) from exc
    with torch.device("meta"), _no_init():  # shapes only; every tensor is then assigned from the file
        model = build_model(config.model)
    for name, spec in layout.items():
        _install(model, name, _parts(name, spec, tensors, str(weights)), tensors, str(weights))
    if config.model.tie_embeddings and "lm_head" not in layout:
        model.lm_head = QuantLinear(
            [Part(t, d, d.shape[0], model.wte.embedding_dim) for t, d in model.wte.parts()], None
        )
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unexpected or left:
        raise AigcError(f"{weights} does not match config.json (missing {left[:3]}, unexpected {unexpected[:3]})")
    return model.eval()


@contextlib.contextmanager
def _no_init():
    """Skip `nn.init` while a model is built on the meta device: its tensors are all assigned from the
    file next, and initialising meta tensors ran through PyTorch's reference decompositions for
    3.2 s on SmolLM2-135M (2-core Xeon, loaded), most of a load. Not thread-safe: loads run one at a time."""
    saved = {name: getattr(nn.init, name) for name in _INITS}
    for name in _INITS:
        setattr(nn.init, name, _unchanged)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


_INITS = ("normal_", "zeros_", "ones_", "uniform_", "kaiming_uniform_")


def _unchanged(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    return tensor


def _install(model: nn.Module, name: str, parts: list[Part], tensors: dict, where: str) -> None:
    """Replace the layer `name` (an nn.Linear or the token embedding) by its quantised form, after
    checking that the parts have its shape."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise AigcError(f"{where}: layer {name} is not part of the model in config.json") from None
    rows, cols = sum(p.rows for p in parts), parts[0].cols
    if isinstance(layer, nn.Embedding):
        expected, new = (layer.num_embeddings, layer.embedding_dim), QuantEmbedding(parts)
    elif isinstance(layer, nn.Linear):
        bias = tensors.pop(f"{name}.bias", None) if layer.bias is not None else None
        if layer.bias is not None and bias is None:
            raise AigcError(f"{where}: {name}.bias is missing")
        expected, new = (layer.out_features, layer.in_features), QuantLinear(parts, bias)
    else:
        raise AigcError(f"{where}: layer {name} is not a linear layer or the embedding")
    if (rows, cols) != expected:
        raise AigcError(
            f"{where}: {name} holds {rows} x {cols} weights, config.json implies {expected[0]} x {expected[1]}"
        )
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
