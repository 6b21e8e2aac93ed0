"""Write a run as a GGUF file (llama.cpp's format, read by llama.cpp, Ollama and LM Studio).

The reverse of `gguf.py`: tensors under llama.cpp's names (`token_embd`, `blk.N.attn_q`, ...),
architecture metadata under `<arch>.*` keys, the tokenizer as `tokenizer.ggml.*` and the chat template.
Llama-style runs are written as `llama` (or `qwen2` when only q/k/v have biases); GPT-2-style runs as
`gpt2`. A LoRA run is merged on the way out. The file is written with `gguf`'s `GGUFWriter` and its
block quantisers, which cover the types of `QUANT_TYPES`; the K-quants and I-quants need llama.cpp's own
`llama-quantize` run on an f16 file.

Layout changes against our model:
- Llama files hold each head's query and key rows in llama.cpp's interleaved rotary order, so they
  are permuted here (`permute_rows`, the inverse of `gguf.unpermute_rows`). Qwen2 files are not.
- Our fused `attn.c_attn` / `mlp.c_fc` are split into q/k/v and gate/up (as for Hugging Face).
- One-dimensional tensors (norms, biases) stay F32, and a matrix whose rows are not a whole number
  of quantisation blocks falls back to F16, as llama.cpp's converter does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_VERSION, GGUFWriter, LlamaFileType
from gguf import GGMLQuantizationType as Q
from gguf.quants import QuantError, quantize

from aigc.artifacts.run import CHAT_TEMPLATE, Run, prepare_out_dir, require_plain_weights
from aigc.config import ModelConfig
from aigc.errors import AigcError
from aigc.fsutil import atomic_path
from aigc.interop.gguf import _PER_LAYER, _TOP_LEVEL
from aigc.interop.gguf_vocab import GGUFTokenizer, vocab_from_run
from aigc.interop.hf import hf_state_dict
from aigc.interop.llama import state_dict_to_hf
from aigc.models import GPT
from aigc.models.lora import has_lora, merge_lora

# --quant -> (tensor type of the matrices, general.file_type)
QUANT_TYPES = {
    "f32": (Q.F32, LlamaFileType.ALL_F32),
    "f16": (Q.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (Q.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, LlamaFileType.MOSTLY_Q4_0),
    "q4_1": (Q.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    "q5_0": (Q.Q5_0, LlamaFileType.MOSTLY_Q5_0),
    "q5_1": (Q.Q5_1, LlamaFileType.MOSTLY_Q5_1),
}
DEFAULT_QUANT = "f16"  # llama.cpp's converter's default
# The output matrix (or the token embedding when the output is tied to it) decides every logit, so
# llama.cpp's llama-quantize keeps it at Q6_K in its 4- and 5-bit files; gguf cannot write Q6_K, so
# it is kept at Q8_0 here (SmolLM2-135M q4_0: see docs/interop.md for what this saves).
HIGHER_PRECISION_OUTPUT = {Q.Q4_0: Q.Q8_0, Q.Q4_1: Q.Q8_0, Q.Q5_0: Q.Q8_0, Q.Q5_1: Q.Q8_0}
# transformers' name -> llama.cpp's (the inverse of gguf.py's reading tables)
_HF_TOP = {hf: ours for ours, hf in _TOP_LEVEL.items()}
_HF_LAYER = {hf: ours for ours, hf in _PER_LAYER.items()}
# GPT-2 names under `transformer.h.N.` (as `hf.hf_state_dict` gives them) -> llama.cpp's under `blk.N.`
_GPT2_LAYER = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
_GPT2_TOP = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}
_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gguf_file_name(quant: str) -> str:
    return f"model-{quant}.gguf"


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """transformers' Q/K row order -> llama.cpp's. weight: (n_head * head_dim, in). Within each
    head, rows i and i + head_dim/2 (rotate_half's pair) become neighbours 2i, 2i + 1."""
    rows, cols = weight.shape
    half = rows // n_head // 2
    # (head, pair, i, in) in transformers' order -> (head, i, pair, in) in the file
    return weight.reshape(n_head, 2, half, cols).transpose(1, 2).reshape(rows, cols)


def architecture(config: ModelConfig) -> str:
    """The GGUF architecture of a run's model, or an AigcError saying why it has none."""
    gpt2 = (config.norm, config.positions, config.mlp) == ("layernorm", "learned", "gelu")
    if gpt2 and config.ffn_size == 4 * config.n_embd and config.tie_embeddings and config.kv_heads == config.n_head:
        return "gpt2"
    if (config.norm, config.positions, config.mlp) != ("rmsnorm", "rotary", "swiglu"):
        raise AigcError(
            f"a model with {config.norm}, {config.positions} positions and a {config.mlp} MLP has no GGUF "
            "architecture; GGUF export takes GPT-2-style runs (gpt2) and Llama-style ones (llama, qwen2)"
        )
    if config.bias:
        raise AigcError("a Llama-style run trained with --bias has no GGUF architecture; train without --bias")
    return "qwen2" if config.qkv_bias else "llama"


# -------------------------------------------------------------------------------------------------
# Tensors
# -------------------------------------------------------------------------------------------------


def llama_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """llama.cpp names -> fp32 tensors (out, in) of a Llama/Qwen2-style model; Q/K permuted for llama."""
    config = model.config
    permute = not config.qkv_bias  # "llama" files only
    out = {}
    for name, tensor in state_dict_to_hf(model.state_dict(), config).items():
        stem, _, kind = name.rpartition(".")
        if stem in _HF_TOP:
            out[f"{_HF_TOP[stem]}.{kind}"] = tensor
            continue
        _, _, layer, part = stem.split(".", 3)  # "model.layers.N.part"
        if permute and name.endswith("q_proj.weight"):
            tensor = permute_rows(tensor, config.n_head)
        elif permute and name.endswith("k_proj.weight"):
            tensor = permute_rows(tensor, config.kv_heads)
        out[f"blk.{layer}.{_HF_LAYER[part]}.{kind}"] = tensor
    return out


def gpt2_tensors(model: GPT) -> dict[str, torch.Tensor]:
    """llama.cpp names -> fp32 tensors of a GPT-2-style model, biases included (zeros where ours has
    none), matrices as (out, in); the tied head is written as `output.weight`, as the converter does."""
    out = {}
    for name, tensor in hf_state_dict(model).items():
        short = name.removeprefix("transformer.")
        if short.endswith(_CONV1D):
            tensor = tensor.t().contiguous()  # Conv1D's (in, out) back to (out, in)
        module, _, kind = short.rpartition(".")
        if module in _GPT2_TOP:
            out[f"{_GPT2_TOP[module]}.{kind}"] = tensor
        else:
            _, layer, part = module.split(".", 2)  # "h.N.part"
            out[f"blk.{layer}.{_GPT2_LAYER[part]}.{kind}"] = tensor
    out["output.weight"] = out["token_embd.weight"]
    return out


def encoded(tensor: torch.Tensor, qtype: Q) -> tuple[np.ndarray, Q]:
    """The array GGUFWriter stores for `tensor` and its type: 1-D tensors F32, matrices `qtype`
    (F16 when a row is not a whole number of blocks)."""
    values = tensor.detach().to(torch.float32).contiguous().numpy()
    if values.ndim == 1 or qtype == Q.F32:
        return values, Q.F32
    try:
        return quantize(values, qtype), qtype
    except QuantError:
        return quantize(values, Q.F16), Q.F16


# -------------------------------------------------------------------------------------------------
# Metadata
# -------------------------------------------------------------------------------------------------


def _add_architecture(w: GGUFWriter, arch: str, c: ModelConfig) -> None:
    w.add_context_length(c.block_size)
    w.add_embedding_length(c.n_embd)
    w.add_feed_forward_length(c.ffn_size)
    w.add_block_count(c.n_layer)
    w.add_head_count(c.n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(1e-5)  # nn.LayerNorm's default, which our blocks use
        return
    w.add_head_count_kv(c.kv_heads)
    w.add_layer_norm_rms_eps(c.norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)


def _add_tokenizer(w: GGUFWriter, vocab: GGUFTokenizer) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    w.add_bos_token_id(vocab.bos_id)
    w.add_eos_token_id(vocab.eos_id)
    w.add_pad_token_id(vocab.pad_id)
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(False)
    if vocab.chat_template is not None:
        w.add_chat_template(vocab.chat_template)


# -------------------------------------------------------------------------------------------------
# Entry point
# -------------------------------------------------------------------------------------------------


def check_exportable(run: Run, quant: str = DEFAULT_QUANT) -> str:
    """The run's GGUF architecture, after refusing what GGUF cannot hold (LSTM, int8) and an unknown quant."""
    if quant not in QUANT_TYPES:
        raise AigcError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANT_TYPES)}")
    if run.config.weights.format == "int8":
        require_plain_weights(run.config, run.path, "GGUF export", verb="export")
    if not isinstance(run.model, GPT):
        raise AigcError(f"run {run.path} is an LSTM, which llama.cpp cannot run; only GPT runs export as GGUF")
    return architecture(run.config.model)


def chat_template_of(run: Run) -> str | None:
    path = run.path / CHAT_TEMPLATE
    return path.read_text(encoding="utf-8") if path.is_file() else None


def write_gguf(run: Run, path: str | os.PathLike, *, quant: str = DEFAULT_QUANT) -> dict[str, int]:
    """Write `run` as one GGUF file at `path` (atomically). Returns tensor type name -> count."""
    arch = check_exportable(run, quant)
    model = run.model
    if has_lora(model):
        merge_lora(model)  # GGUF has no adapters: fold them into the weights
    vocab = vocab_from_run(run.tokenizer, model.config.vocab_size, chat_template_of(run))
    tensors = gpt2_tensors(model) if arch == "gpt2" else llama_tensors(model)
    qtype, file_type = QUANT_TYPES[quant]
    counts: dict[str, int] = {}
    with atomic_path(path) as tmp:
        w = GGUFWriter(str(tmp), arch)
        w.add_name(run.path.resolve().name)
        w.add_file_type(int(file_type))
        w.add_quantization_version(GGML_QUANT_VERSION)
        _add_architecture(w, arch, model.config)
        _add_tokenizer(w, vocab)
        output = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        for name, tensor in tensors.items():
            wanted = HIGHER_PRECISION_OUTPUT.get(qtype, qtype) if name == output else qtype
            data, stored = encoded(tensor, wanted)
            w.add_tensor(name, data, raw_dtype=stored if stored not in (Q.F32, Q.F16) else None)
            counts[stored.name] = counts.get(stored.name, 0) + 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return counts


def export_gguf(run: Run, out_dir: str | os.PathLike, *, quant: str = DEFAULT_QUANT, overwrite: bool = False) -> Path:
    """`aigc export RUN --format gguf`: a folder holding `model-<quant>.gguf`."""
    check_exportable(run, quant)  # refused before the folder is touched
    out = prepare_out_dir(out_dir, overwrite=overwrite)
    write_gguf(run, out / gguf_file_name(quant), quant=quant)
    return out
