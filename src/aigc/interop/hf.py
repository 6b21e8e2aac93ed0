"""Export a run as a Hugging Face GPT-2 folder, and import such a folder as a run.

Our GPT is the GPT-2 architecture with the same module names, so the mapping is one-to-one. The only
change of layout: `nn.Linear` stores weights as (out, in), GPT-2's `Conv1D` as (in, out), so the four
block projections are transposed. The output head is tied to `wte` on both sides and is not stored.

Export needs no `transformers`: config.json, generation_config.json and tokenizer_config.json are
plain JSON, model.safetensors is written with `safetensors`, tokenizer.json is our tokenizer as is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from aigc.artifacts.run import Run, RunConfig, prepare_out_dir, require_plain_weights, save_run
from aigc.config import ModelConfig
from aigc.errors import AigcError
from aigc.fsutil import write_json, write_text, write_with
from aigc.interop.card import model_card
from aigc.interop.dims import check_gpt2_dims, whole
from aigc.interop.hf_files import read_hf_config, read_hf_shapes, read_hf_weights, read_tokenizer_file, shapes_of
from aigc.models import GPT
from aigc.models.lora import has_lora, merge_lora
from aigc.tokenizer import EOT, PAD, Tokenizer, label_token

TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
PREFIX = "transformer."
# GPT-2 variants whose maths is ours: tanh-approximated GELU under its three names.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


# -------------------------------------------------------------------------------------------------
# Export
# -------------------------------------------------------------------------------------------------


def hf_config(model_config: ModelConfig, tokenizer: Tokenizer) -> dict:
    """config.json of a `transformers` GPT2LMHeadModel with our shape and special tokens."""
    c = model_config
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,  # read by older tools (and vLLM's GPT-2 loader on old transformers)
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,  # None means 4 * n_embd, as in our MLP
        "activation_function": "gelu_new",  # = F.gelu(approximate="tanh")
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which our blocks use
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.pad_id,
        "torch_dtype": "float32",
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our GPT's weights under GPT-2 names and layouts (lm_head omitted: tied to wte)."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            continue
        tensor = tensor.detach().to(torch.float32)
        if name.endswith(TRANSPOSED):
            tensor = tensor.t()  # (out, in) -> Conv1D's (in, out)
        tensors[PREFIX + name] = tensor.contiguous()
    if not model.config.bias:  # GPT-2 always has biases: zeros are the exact equivalent of none
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is None and name != "lm_head":
                out = module.weight.shape[0] if isinstance(module, nn.Linear) else module.normalized_shape[0]
                tensors[PREFIX + name + ".bias"] = torch.zeros(out)
    return tensors


def tokenizer_config(tokenizer: Tokenizer, block_size: int) -> dict:
    """tokenizer_config.json so that `AutoTokenizer` builds a fast GPT-2 tokenizer from tokenizer.json."""
    labels = [label_token(label) for label in tokenizer.labels]
    return {
        "tokenizer_class": "GPT2TokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "pad_token": PAD,
        "additional_special_tokens": labels,  # (a list here; newer `extra_special_tokens` is a dict in 4.x)
        "add_prefix_space": False,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,  # keep decode(encode(text)) == text
        "model_max_length": block_size,
    }


def generation_config(tokenizer: Tokenizer) -> dict:
    """Defaults for `model.generate`; like `aigc generate`, padding and label tokens are never generated."""
    banned = [tokenizer.pad_id] + [tokenizer.label_id(label) for label in tokenizer.labels]
    return {
        "bos_token_id": tokenizer.eot_id,
        "eos_token_id": tokenizer.eot_id,
        "pad_token_id": tokenizer.pad_id,
        "suppress_tokens": banned,
        "do_sample": True,
        "temperature": 0.8,
        "max_new_tokens": 200,
    }


def export_hf(run: Run, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `run` as a folder that `AutoModelForCausalLM/AutoTokenizer.from_pretrained` load offline."""
    model = run.model
    if run.config.weights.format in ("int8", "quantized"):
        require_plain_weights(run.config, run.path, "Hugging Face export", verb="export")
    if not isinstance(model, GPT):
        raise AigcError(
            f"run {run.path} is an LSTM; the Hugging Face format has no GPT-2 equivalent of an "
            "Embedding→LSTM→Dense model, so only GPT runs export (use --format int8, or train with --model gpt)"
        )
    c = model.config
    if (c.norm, c.positions, c.mlp, c.n_kv_head, c.qkv_bias, c.tie_embeddings) != (
        "layernorm",
        "learned",
        "gelu",
        0,
        False,
        True,
    ) or c.ffn_size != 4 * c.n_embd:
        raise AigcError(
            f"run {run.path} is not GPT-2-shaped (norm {c.norm}, positions {c.positions}, mlp {c.mlp}) and "
            "`aigc export --format hf` writes GPT-2 folders only; `aigc export --format int8` makes a smaller run "
            "of it, and a run made by `aigc import` can be shared as the file or folder it was imported from"
        )
    out = prepare_out_dir(out_dir, overwrite=overwrite)
    if has_lora(model):
        merge_lora(model)  # the hub format has no adapters: fold them into the weights
    tensors = hf_state_dict(model)
    write_with(out / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(out / "config.json", hf_config(model.config, run.tokenizer))
    write_json(out / "generation_config.json", generation_config(run.tokenizer))
    run.tokenizer.save(out / "tokenizer.json")
    write_json(out / "tokenizer_config.json", tokenizer_config(run.tokenizer, model.config.block_size))
    write_json(out / "special_tokens_map.json", special_tokens_map(run.tokenizer))
    write_text(out / "README.md", model_card(run))
    return out


def special_tokens_map(tokenizer: Tokenizer) -> dict:
    return {
        "bos_token": EOT,
        "eos_token": EOT,
        "unk_token": EOT,
        "pad_token": PAD,
        "additional_special_tokens": [label_token(label) for label in tokenizer.labels],
    }


# -------------------------------------------------------------------------------------------------
# Import
# -------------------------------------------------------------------------------------------------


def model_config_from_hf(hf: dict, src: Path) -> ModelConfig:
    """Our ModelConfig for a GPT-2-type config.json; anything we cannot reproduce exactly is an error."""
    where = f"{src}/config.json"
    kind, arch = hf.get("model_type"), hf.get("architectures") or []
    if kind != "gpt2":
        found = f"model_type {kind!r}" + (f" ({', '.join(arch)})" if arch else "")
        raise AigcError(f"{src} holds a {found} model, not GPT-2; only GPT-2-type models can be imported")
    checks = {
        "activation_function": (hf.get("activation_function", "gelu_new") in TANH_GELU, "a tanh GELU"),
        "n_inner": (hf.get("n_inner") in (None, 4 * whole(hf, "n_embd", where)), "4 * n_embd"),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", True), "tied embeddings"),
        "scale_attn_by_inverse_layer_idx": (not hf.get("scale_attn_by_inverse_layer_idx", False), "false"),
        "add_cross_attention": (not hf.get("add_cross_attention", False), "false"),
        "layer_norm_epsilon": (_near(hf.get("layer_norm_epsilon", 1e-5), 1e-5), "1e-5"),
    }
    for key, (ok, wanted) in checks.items():
        if not ok:
            raise AigcError(
                f"{src}/config.json has {key}={hf.get(key)!r}; aigc's GPT needs {wanted}, so it cannot import it"
            )
    return ModelConfig(
        kind="gpt",
        vocab_size=whole(hf, "vocab_size", where),
        block_size=whole(hf, "n_positions" if "n_positions" in hf else "n_ctx", where, default=1024),
        n_layer=whole(hf, "n_layer", where),
        n_head=whole(hf, "n_head", where),
        n_embd=whole(hf, "n_embd", where),
        dropout=0.0,
        bias=True,
    )


def our_state_dict(tensors: dict[str, torch.Tensor], config: ModelConfig, src: Path) -> dict[str, torch.Tensor]:
    """GPT-2 tensors -> our names and layouts. Unknown or missing tensors are an error."""
    state = {}
    for name, tensor in tensors.items():
        short = name[len(PREFIX) :] if name.startswith(PREFIX) else name
        if short.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal-mask buffers of older transformers versions, not weights
        if short == "lm_head.weight":
            continue  # tied to wte (checked by tie_word_embeddings)
        state[short] = tensor.t() if short.endswith(TRANSPOSED) else tensor
    with torch.device("meta"):  # names and shapes only, no memory or initialisation
        expected = {k: v.shape for k, v in GPT(config).state_dict().items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise AigcError(
            f"weights in {src} do not match a GPT-2 of this config.json (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]})"
        )
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v)}" for k, v in expected.items() if state[k].shape != v]
    if wrong:
        raise AigcError(f"weights in {src} have other shapes than its config.json says: {'; '.join(wrong[:2])}")
    return {k: v.to(torch.float32).contiguous() for k, v in state.items()}


def _near(value, wanted: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value - wanted) < 1e-12


def read_hf_tokenizer(src: Path) -> tuple[Tokenizer, bool]:
    """The folder's byte-level BPE tokenizer in our wrapper; adds `<|pad|>` if missing (returns whether)."""
    if (src / "tokenizer.json").is_file():
        hf = read_tokenizer_file(src / "tokenizer.json")
    elif (src / "vocab.json").is_file() and (src / "merges.txt").is_file():
        hf = _tokenizer_from_vocab_merges(src)
    else:
        raise AigcError(
            f"{src} has no tokenizer.json (nor vocab.json + merges.txt); copy the model's tokenizer into it"
        )
    pre = json.loads(hf.to_str()).get("pre_tokenizer") or {}
    if "ByteLevel" not in json.dumps(pre):
        raise AigcError(
            f"{src} has a {pre.get('type', 'non')}-pre-tokenized tokenizer; aigc needs GPT-2's byte-level BPE"
        )
    if hf.token_to_id(EOT) is None:
        raise AigcError(f"the tokenizer in {src} has no {EOT} token; a GPT-2-type tokenizer must have one")
    hf.add_special_tokens([AddedToken(EOT, special=True)])  # GPT-2's vocab.json lists it as a plain entry
    added_pad = hf.token_to_id(PAD) is None
    if added_pad:
        hf.add_special_tokens([AddedToken(PAD, special=True)])
    return Tokenizer(hf), added_pad


def _tokenizer_from_vocab_merges(src: Path):
    try:
        hf = HFTokenizer(models.BPE.from_file(str(src / "vocab.json"), str(src / "merges.txt")))
    except Exception as exc:  # `tokenizers` raises its errors as plain Exception
        raise AigcError(f"{src}/vocab.json and merges.txt are not a BPE vocabulary ({exc}); restore them") from exc
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    return hf


def fit_vocabulary(state: dict[str, torch.Tensor], tokenizer: Tokenizer, added_pad: bool, src: Path) -> int:
    """Check the tokenizer against the embedding rows; grow one row for an added pad token.

    The new row is the mean of all rows. With tied weights its logit is the mean logit, so by Jensen's
    inequality its probability is at most 1/V: an added pad is never likelier than uniform.
    """
    rows = state["wte.weight"].shape[0]
    original = tokenizer.vocab_size - (1 if added_pad else 0)
    if original > rows:
        raise AigcError(
            f"the tokenizer in {src} has {original} tokens but the weights only {rows} embedding rows; "
            "the tokenizer does not belong to these weights"
        )
    if tokenizer.pad_id >= rows:
        wte = state["wte.weight"]  # (V, C)
        state["wte.weight"] = torch.cat([wte, wte.mean(dim=0, keepdim=True)])  # (V + 1, C)
    return state["wte.weight"].shape[0]


def import_hf(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Make a run of a local Hugging Face GPT-2-type folder (weights + tokenizer)."""
    src = Path(src_dir)
    hf = read_hf_config(src)
    config = model_config_from_hf(hf, src)
    shapes = read_hf_shapes(src)  # from the headers: declared sizes are checked before any weight is read
    if shapes is not None:
        check_gpt2_dims(hf, shapes, f"{src}/config.json")
    tokenizer, added_pad = read_hf_tokenizer(src)
    tensors = read_hf_weights(src)
    check_gpt2_dims(hf, shapes_of(tensors), f"{src}/config.json")
    state = our_state_dict(tensors, config, src)
    rows = fit_vocabulary(state, tokenizer, added_pad, src)
    config = dataclasses.replace(config, vocab_size=rows)
    model = GPT(config)
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state)
    run_config = RunConfig(
        model=config,
        data={"labels": list(tokenizer.labels), "tokenizer_fingerprint": tokenizer.vocab_fingerprint()},
        extra={"imported_from": {"path": str(src.resolve()), "model_type": "gpt2", "added_pad_token": added_pad}},
    )
    return save_run(prepare_out_dir(out_dir, overwrite=overwrite), run_config, tokenizer, model)
