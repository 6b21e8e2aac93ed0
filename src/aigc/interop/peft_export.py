"""`aigc export RUN --format peft`: a LoRA run's adapters as `peft` writes them, plus their base.

The folder is what `PeftModel.from_pretrained(base, DIR)` and vLLM's `--lora-modules name=DIR` read:
`adapter_config.json` + `adapter_model.safetensors` (tensors named
`base_model.model.<transformers module>.lora_A.weight` / `.lora_B.weight`), and `base/`, a Hugging Face
folder of the frozen weights the adapters apply to (GPT2LMHeadModel, LlamaForCausalLM or
Qwen2ForCausalLM).

Our fused layers hold one adapter where transformers has several linear layers: `attn.c_attn` is
q, k and v stacked along the output rows, `mlp.c_fc` gate and up. The update of a fused layer is
s · B A with B (q + k + v, r), so each part's update is s · B_part A: the part gets the shared A and
its rows of B, which is exact (peft's rank per part is the same r). GPT-2 keeps the fused layers
(its `Conv1D` `c_attn`, `c_fc`), so its adapters map one to one (`fan_in_fan_out`: Conv1D stores
(in, out), while the adapters are (r, in) and (out, r) on both sides).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from aigc.artifacts.run import Run, Weights, prepare_out_dir
from aigc.config import ModelConfig
from aigc.errors import AigcError
from aigc.fsutil import write_json, write_with
from aigc.interop.gguf_export import architecture, chat_template_of
from aigc.interop.hf import export_hf
from aigc.interop.llama import hf_config_from, state_dict_to_hf
from aigc.models import GPT, build_model, vocab
from aigc.models.lora import LoRALinear, LoRASpec, QuantLoRALinear
from aigc.models.qlayers import expand_quantised, quantised_weights
from aigc.tokenizer import EOT, PAD

ADAPTER_CONFIG, ADAPTER_WEIGHTS, BASE = "adapter_config.json", "adapter_model.safetensors", "base"
PREFIX = "base_model.model."
# our module under `h.N.` -> transformers' modules under `model.layers.N.` (in the order they are stacked)
LLAMA_PARTS = {
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.c_proj": ("self_attn.o_proj",),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.c_proj": ("mlp.down_proj",),
}


def _part_rows(config: ModelConfig, module: str) -> list[int]:
    kv = config.kv_heads * config.head_dim
    rows = {"attn.c_attn": [config.n_head * config.head_dim, kv, kv], "mlp.c_fc": [config.ffn_size] * 2}
    return rows.get(module, [-1])


def peft_tensors(model: GPT, gpt2: bool) -> dict[str, torch.Tensor]:
    """transformers-named adapter tensors (without peft's prefix) of every LoRA layer of `model`."""
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoRALinear):
            continue
        a, b = module.lora_A.detach(), module.lora_B.detach()  # (r, in), (out, r)
        if name == "lm_head":
            targets = [("lm_head", b)]
        elif gpt2:
            targets = [(f"transformer.{name}", b)]
        else:
            _, layer, part = name.split(".", 2)  # "h.N.part"
            pieces = b.split(_part_rows(model.config, part), dim=0) if len(LLAMA_PARTS[part]) > 1 else [b]
            targets = [(f"model.layers.{layer}.{theirs}", piece) for theirs, piece in zip(LLAMA_PARTS[part], pieces)]
        for theirs, piece in targets:
            out[f"{theirs}.lora_A.weight"] = a.clone()  # one copy per part: safetensors stores no shared tensors
            out[f"{theirs}.lora_B.weight"] = piece.contiguous()
    return out


def target_modules(modules: list[str], all_linear: list[str]) -> list[str]:
    """peft's target_modules: short names (`q_proj`) when they pick exactly the adapted layers,
    else the full module names (peft matches a target as the name or its dotted suffix)."""
    short = sorted({m.rsplit(".", 1)[-1] for m in modules})
    picked = [m for m in all_linear if m.rsplit(".", 1)[-1] in short]
    return short if sorted(picked) == sorted(modules) else sorted(modules)


def _hf_linear_names(config: ModelConfig, gpt2: bool) -> list[str]:
    if gpt2:
        parts = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
        return [f"transformer.h.{i}.{p}" for i in range(config.n_layer) for p in parts] + ["lm_head"]
    parts = [p for group in LLAMA_PARTS.values() for p in group]
    return [f"model.layers.{i}.{p}" for i in range(config.n_layer) for p in parts] + ["lm_head"]


def adapter_config(spec: LoRASpec, modules: list[str], base: Path, config: ModelConfig, gpt2: bool) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base.resolve()),
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": target_modules(modules, _hf_linear_names(config, gpt2)),
        "bias": "none",
        "fan_in_fan_out": gpt2,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def base_model(model: GPT) -> GPT:
    """A plain copy of the frozen weights under the adapters (the base, with any rows the run added).
    A quantised base is expanded to float32: the weights the adapters were trained against."""
    if quantised_weights(model):
        return _expanded_base(model)
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    base = build_model(model.config)
    base.load_state_dict(state)
    return base


def _expanded_base(model: GPT) -> GPT:
    base = copy.deepcopy(model)
    for name, module in list(base.named_modules()):
        if isinstance(module, QuantLoRALinear):  # the adapters go to adapter_model.safetensors, not here
            parent, _, child = name.rpartition(".")
            setattr(base.get_submodule(parent), child, module.base)
    return expand_quantised(vocab.fold(base))


def write_llama_folder(run: Run, model: GPT, out: Path) -> None:
    """A transformers LlamaForCausalLM / Qwen2ForCausalLM folder of `model` with the run's tokenizer."""
    tokenizer = run.tokenizer
    config = {**hf_config_from(model.config), "bos_token_id": tokenizer.eot_id, "eos_token_id": tokenizer.eot_id}
    config["pad_token_id"] = tokenizer.pad_id
    tensors = state_dict_to_hf(model.state_dict(), model.config)
    out.mkdir(parents=True, exist_ok=True)
    write_with(out / "model.safetensors", lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(out / "config.json", config)
    tokenizer.save(out / "tokenizer.json")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOT,
        "eos_token": EOT,
        "pad_token": PAD,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.config.block_size,
    }
    template = chat_template_of(run)
    if template is not None:
        tokenizer_config["chat_template"] = template
    write_json(out / "tokenizer_config.json", tokenizer_config)


def export_peft(run: Run, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write the adapters of a LoRA run in peft's format, and its base as `base/`."""
    if run.config.weights.format != "lora":
        raise AigcError(
            f"run {run.path} has {run.config.weights.format} weights, not LoRA adapters; --format peft exports "
            "LoRA runs (train with --init-from BASE --lora-rank R); use --format hf or gguf for whole models"
        )
    gpt2 = architecture(run.config.model) == "gpt2"
    model = run.model
    tensors = peft_tensors(model, gpt2)
    modules = sorted({name.rsplit(".lora_", 1)[0] for name in tensors})
    spec = LoRASpec.from_json(run.config.weights.lora)
    out = prepare_out_dir(out_dir, overwrite=overwrite)
    base = base_model(model)
    if gpt2:
        plain = dataclasses.replace(run.config, weights=Weights())
        export_hf(Run(path=run.path, config=plain, tokenizer=run.tokenizer, model=base), out / BASE, overwrite=True)
    else:
        write_llama_folder(run, base, out / BASE)
    named = {PREFIX + k: v for k, v in tensors.items()}
    write_with(out / ADAPTER_WEIGHTS, lambda tmp: save_file(named, str(tmp), metadata={"format": "pt"}))
    write_json(out / ADAPTER_CONFIG, adapter_config(spec, modules, out / BASE, model.config, gpt2))
    return out
