"""Declared sizes of an imported model, checked against the tensors the file actually holds.

A config.json or GGUF header is a few bytes that a hostile or broken file can fill with any number:
`num_hidden_layers` 10^9 made the importers build a billion-entry table of expected tensors (5.5 GB,
a minute, then MemoryError). Every size that decides how much is allocated is read here as a whole
number >= 1 and compared with the names and shapes of the tensors present (read from file headers,
before any weight is loaded), so that what the importers build afterwards is bounded by the file.

`where` names the file in the messages; `names` maps the Hugging Face field name to the key the file
itself uses (a GGUF says `llama.block_count` where config.json says `num_hidden_layers`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from aigc.errors import AigcError

_LLAMA_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_GPT2_LAYER = re.compile(r"^(?:transformer\.)?h\.(\d+)\.")
_MISSING = object()


def whole(config: Mapping, field: str, where: str, *, default=_MISSING, key: str | None = None) -> int:
    """`config[field]` as an int >= 1, or an AigcError naming the file, the key and the value."""
    key = key or field
    value = config.get(field, default)
    if value is _MISSING or value is None:
        raise AigcError(f"{where}: {key} is missing; the model's size cannot be known without it")
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON writers may spell 64 as 64.0
    if isinstance(value, bool) or not isinstance(value, int):
        raise AigcError(f"{where}: {key} is {value!r}, not a whole number; the file is damaged or hand-edited")
    if value < 1:
        raise AigcError(f"{where}: {key} is {value}; it must be at least 1, the file is damaged or hand-edited")
    return value


def _layers(shapes: Mapping[str, tuple], pattern: re.Pattern) -> list[int]:
    return sorted({int(m.group(1)) for name in shapes if (m := pattern.match(name))})


def _check_layers(declared: int, found: list[int], key: str, where: str) -> None:
    if declared != len(found) or found != list(range(len(found))):
        held = f"layers {found[0]}..{found[-1]}" if found else "no layers"
        raise AigcError(f"{where}: {key} is {declared} but the file holds tensors of {len(found)} ({held})")


def _shape(shapes: Mapping[str, tuple], name: str, ndim: int, where: str) -> tuple[int, ...]:
    shape = shapes.get(name)
    if shape is None:
        raise AigcError(f"{where}: the weights have no {name}; the file is incomplete or not this kind of model")
    if len(shape) != ndim:
        raise AigcError(f"{where}: {name} has shape {tuple(shape)}, not {ndim}-dimensional; the file is damaged")
    return tuple(int(d) for d in shape)


def _same(declared: int, held: int, key: str, what: str, where: str) -> None:
    if declared != held:
        raise AigcError(f"{where}: {key} is {declared} but {what} is {held}; the header and the weights disagree")


def check_llama_dims(
    hf: Mapping, shapes: Mapping[str, tuple], where: str, names: Mapping[str, str] | None = None
) -> None:
    """Every size of a Llama-family config (HF field names) against HF-named tensor shapes.

    Shapes: embed_tokens (vocab, hidden); layer 0's q_proj (heads * head_dim, hidden), k_proj
    (kv_heads * head_dim, hidden), gate_proj (intermediate, hidden). The other layers are checked
    tensor by tensor later (`llama.state_dict_from_hf`), against a model no larger than this one."""
    names = names or {}

    def key(field: str) -> str:
        return names.get(field, field)

    def size(field: str, default=_MISSING) -> int:
        return whole(hf, field, where, default=default, key=key(field))

    _check_layers(size("num_hidden_layers"), _layers(shapes, _LLAMA_LAYER), key("num_hidden_layers"), where)
    vocab, hidden = _shape(shapes, "model.embed_tokens.weight", 2, where)
    _same(size("vocab_size"), vocab, key("vocab_size"), "the embedding's row count", where)
    _same(size("hidden_size"), hidden, key("hidden_size"), "the embedding's width", where)
    heads, heads_key, kv_key = size("num_attention_heads"), key("num_attention_heads"), key("num_key_value_heads")
    if hf.get("head_dim") is None and hidden % heads:
        raise AigcError(f"{where}: {key('hidden_size')} {hidden} is not a multiple of {heads_key} {heads}")
    head_dim = size("head_dim", hidden // heads)
    layer0 = "model.layers.0."
    q_rows = _shape(shapes, layer0 + "self_attn.q_proj.weight", 2, where)[0]
    _same(heads * head_dim, q_rows, f"{heads_key} x head size", "layer 0's q_proj row count", where)
    kv_heads = size("num_key_value_heads", heads)
    k_rows = _shape(shapes, layer0 + "self_attn.k_proj.weight", 2, where)[0]
    _same(kv_heads * head_dim, k_rows, f"{kv_key} x head size", "layer 0's k_proj row count", where)
    if heads % kv_heads:
        raise AigcError(f"{where}: {heads_key} {heads} is not a multiple of {kv_key} {kv_heads}")
    inner = _shape(shapes, layer0 + "mlp.gate_proj.weight", 2, where)[0]
    _same(size("intermediate_size"), inner, key("intermediate_size"), "layer 0's gate_proj row count", where)
    size("max_position_embeddings", 2048)  # no tensor holds it; the KV cache is sized by --context anyway
    window = hf.get("sliding_window")
    if window is not None:
        size("sliding_window")


def check_gpt2_dims(hf: Mapping, shapes: Mapping[str, tuple], where: str) -> None:
    """Every size of a GPT-2 config against its tensors: wte (vocab, n_embd), wpe (n_positions,
    n_embd), `h.N.` layers. The head count shows in no shape; it must divide n_embd."""
    prefix = "transformer." if "transformer.wte.weight" in shapes else ""
    _check_layers(whole(hf, "n_layer", where), _layers(shapes, _GPT2_LAYER), "n_layer", where)
    vocab, width = _shape(shapes, prefix + "wte.weight", 2, where)
    _same(whole(hf, "vocab_size", where), vocab, "vocab_size", "the embedding's row count", where)
    _same(whole(hf, "n_embd", where), width, "n_embd", "the embedding's width", where)
    positions = _shape(shapes, prefix + "wpe.weight", 2, where)[0]
    field = "n_positions" if "n_positions" in hf else "n_ctx"
    _same(whole(hf, field, where, default=1024), positions, field, "the position embedding's row count", where)
    heads = whole(hf, "n_head", where)
    if width % heads:
        raise AigcError(f"{where}: n_embd {width} is not a multiple of n_head {heads}")
