"""Reading the files of a local Hugging Face model folder, where any of them may be damaged or hostile.

config.json, the weights (model.safetensors, its sharded form with model.safetensors.index.json, or
pytorch_model.bin) and tokenizer files each become an AigcError naming the file when they cannot be
read. Shard names in the index must stay inside the folder. `read_hf_shapes` reads tensor names and
shapes from the safetensors headers alone, so declared sizes are checked before any weight is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from tokenizers import Tokenizer as HFTokenizer

from aigc.errors import AigcError

SINGLE, INDEX, PICKLE = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AigcError(f"{path} is not valid UTF-8 JSON ({exc}); restore the file") from exc
    if not isinstance(value, dict):
        raise AigcError(f"{path} holds a JSON {type(value).__name__}, not an object; restore the file")
    return value


def read_hf_config(src: Path) -> dict:
    path = src / "config.json"
    if not src.is_dir():
        raise AigcError(f"{src} is not a folder; pass a local Hugging Face model folder (config.json + weights)")
    if not path.is_file():
        raise AigcError(f"{src} has no config.json; it is not a Hugging Face model folder")
    return read_json_object(path)


def _shard_files(src: Path) -> list[Path]:
    """The shards model.safetensors.index.json names, each checked to be a file name inside `src`
    (an index is user data: "../../etc/passwd" or an absolute path must not be opened)."""
    path = src / INDEX
    weight_map = read_json_object(path).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise AigcError(f"{path} has no weight_map of tensor name -> shard file; restore the file")
    shards = sorted(set(weight_map.values()))
    for name in shards:
        posix, windows = PurePosixPath(name), PureWindowsPath(name)
        if not name or posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in windows.parts:
            raise AigcError(f"{path} names the shard {name!r}, outside the model folder; shards must be files in {src}")
    return [src / name for name in shards]


def _weights_source(src: Path) -> tuple[str, list[Path]]:
    if (src / SINGLE).is_file():
        return "safetensors", [src / SINGLE]
    if (src / INDEX).is_file():
        return "safetensors", _shard_files(src)
    if (src / PICKLE).is_file():
        return "pickle", [src / PICKLE]
    raise AigcError(f"{src} has no model.safetensors (or pytorch_model.bin); the folder holds no weights")


def read_hf_shapes(src: Path) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape from the safetensors headers (no weight is read); None for a
    pytorch_model.bin, whose shapes are only known once it is loaded."""
    kind, files = _weights_source(src)
    if kind == "pickle":
        return None
    shapes = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
        except (SafetensorError, OSError) as exc:
            raise AigcError(f"{file} is not a readable safetensors file ({exc}); is it truncated?") from exc
    return shapes


def read_hf_weights(src: Path) -> dict[str, torch.Tensor]:
    """All tensors of the folder: model.safetensors, its sharded form, or pytorch_model.bin (weights only)."""
    kind, files = _weights_source(src)
    if kind == "pickle":
        return _read_pickle(files[0])
    tensors = {}
    for file in files:
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise AigcError(f"{file} is not a readable safetensors file ({exc}); is it truncated?") from exc
    return tensors


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, runtime, EOF) for a damaged file
        raise AigcError(f"{path} is not a readable PyTorch weights file ({type(exc).__name__}); restore it") from exc
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AigcError(f"{path} holds no name -> tensor table; it is not a model's weights file")
    return tensors


def shapes_of(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def read_tokenizer_file(path: Path) -> HFTokenizer:
    """A `tokenizers` tokenizer.json, or an AigcError naming it."""
    try:
        return tokenizer_from_str(path.read_text(encoding="utf-8"), str(path))
    except UnicodeDecodeError as exc:
        raise AigcError(f"{path} is not UTF-8 text; restore the model's tokenizer.json") from exc


def tokenizer_from_str(text: str, where: str) -> HFTokenizer:
    try:
        return HFTokenizer.from_str(text)
    except Exception as exc:  # `tokenizers` raises its errors as plain Exception
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise AigcError(f"{where} is not a valid tokenizer ({reason}); restore the model's tokenizer files") from exc
