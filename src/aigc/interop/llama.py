"""Pure conversions between Hugging Face Llama-family checkpoints and our GPT (no file I/O).

Supported: LlamaForCausalLM, Qwen2ForCausalLM (bias on q/k/v only), MistralForCausalLM (its sliding
window is exact while the context fits inside it). Our GPT uses HF's rotary layout (`rotate_half`),
so weights map with no permutation; the only change of layout is fusion: q, k, v are concatenated
along the output dimension into `attn.c_attn` ((n_head + 2 * n_kv_head) * head_dim, C) and gate, up
into `mlp.c_fc` (2 * ffn, C). Both sides store linear weights as (out, in).
"""

from __future__ import annotations

import math

import torch

from aigc.config import ModelConfig
from aigc.errors import AigcError
from aigc.interop.dims import whole
from aigc.models.gpt import GPT
from aigc.models.kinds import family

SUPPORTED = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")
MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}
# Per-block tensors: HF name under `model.layers.N.` -> ours under `h.N.` (q/k/v, gate/up fused apart).
BLOCK_NAMES = {
    "input_layernorm.weight": "ln_1.weight",
    "post_attention_layernorm.weight": "ln_2.weight",
    "self_attn.o_proj.weight": "attn.c_proj.weight",
    "self_attn.o_proj.bias": "attn.c_proj.bias",
    "mlp.down_proj.weight": "mlp.c_proj.weight",
    "mlp.down_proj.bias": "mlp.c_proj.bias",
}
FUSED = {
    "attn.c_attn": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.c_fc": ("mlp.gate_proj", "mlp.up_proj"),
}
TOP_NAMES = {
    "model.embed_tokens.weight": "wte.weight",
    "model.norm.weight": "ln_f.weight",
    "lm_head.weight": "lm_head.weight",
}


def _architecture(hf: dict) -> str:
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise AigcError(f"architectures must be a list of class names, not {archs!r}; the config is damaged")
    found = [a for a in archs if a in SUPPORTED]
    if not found:
        given = ", ".join(hf.get("architectures") or []) or f"model_type {hf.get('model_type')!r}"
        raise AigcError(f"unsupported architecture {given}; aigc imports {', '.join(SUPPORTED)}")
    return found[0]


def _rope_theta(hf: dict, where: str) -> float:
    """rope_theta from transformers 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`)."""
    params, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise AigcError(f"{where}: rope_parameters / rope_scaling must be JSON objects; the file is damaged")
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise AigcError(f"rope scaling {kind!r} is not supported; aigc reproduces plain rotary positions only")
    return _number({"rope_theta": params.get("rope_theta", hf.get("rope_theta", 10000.0))}, "rope_theta", 0, where)


def _biases(arch: str, hf: dict) -> tuple[bool, bool]:
    """(bias, qkv_bias): Qwen2 has q/k/v biases only; Llama's two flags must agree (ours is one)."""
    if arch == "Qwen2ForCausalLM":
        return False, True
    attention, mlp = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention != mlp:
        raise AigcError(f"attention_bias={attention} with mlp_bias={mlp} is not supported; aigc needs both alike")
    return attention, False


def model_config_from_hf(hf_config: dict, *, block_size: int | None = None, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig for a Llama/Qwen2/Mistral config.json (as a dict). block_size defaults to
    max_position_embeddings (or a smaller sliding window); the KV cache preallocates that many
    positions per row, so pass less to save memory. Anything we cannot reproduce is an AigcError
    naming `where`. The sizes are only read here: `dims.check_llama_dims` compares them with the
    tensors before anything is built from them."""
    hf, arch = hf_config, _architecture(hf_config)
    if hf.get("hidden_act", "silu") != "silu":
        raise AigcError(f"hidden_act {hf.get('hidden_act')!r} is not supported; aigc's SwiGLU uses silu")
    heads, width = whole(hf, "num_attention_heads", where), whole(hf, "hidden_size", where)
    if hf.get("head_dim") not in (None, width // heads):
        raise AigcError(f"{where}: head_dim {hf['head_dim']!r} != hidden_size / num_attention_heads; not supported")
    if hf.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise AigcError(f"{where}: partial_rotary_factor {hf['partial_rotary_factor']!r} is not supported; only 1")
    if hf.get("use_sliding_window"):
        raise AigcError("Qwen2 with use_sliding_window=true is not supported; only full attention")
    window = whole(hf, "sliding_window", where) if arch == "MistralForCausalLM" and hf.get("sliding_window") else None
    limit = min(whole(hf, "max_position_embeddings", where, default=2048), window or 1 << 62)
    if block_size is not None and block_size > limit:
        raise AigcError(f"block_size {block_size} exceeds what this model reproduces exactly ({limit})")
    bias, qkv_bias = _biases(arch, hf)
    return ModelConfig(
        kind="gpt",
        vocab_size=whole(hf, "vocab_size", where),
        block_size=block_size or limit,
        n_layer=whole(hf, "num_hidden_layers", where),
        n_head=heads,
        n_embd=width,
        n_kv_head=whole(hf, "num_key_value_heads", where, default=heads),
        ffn_hidden=whole(hf, "intermediate_size", where),
        norm="rmsnorm",
        norm_eps=_number(hf, "rms_norm_eps", 1e-6, where),
        positions="rotary",
        rope_theta=_rope_theta(hf, where),
        mlp="swiglu",
        bias=bias,
        qkv_bias=qkv_bias,
        dropout=0.0,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _number(hf: dict, key: str, default: float, where: str) -> float:
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise AigcError(f"{where}: {key} is {value!r}, not a positive number; the file is damaged or hand-edited")
    return float(value)


def _expected_shapes(config: ModelConfig) -> dict[str, tuple]:
    with torch.device("meta"):  # names and shapes only, no memory or initialisation
        return {name: tuple(t.shape) for name, t in GPT(config).state_dict().items()}


def state_dict_from_hf(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict (float32), ready for `GPT(config).load_state_dict`. With tied
    embeddings HF stores no lm_head.weight; ours gets the embedding under both names."""
    state, used = {}, set()
    for name, tensor in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):  # a buffer older checkpoints saved; recomputed here
            used.add(name)
        elif name in TOP_NAMES:
            state[TOP_NAMES[name]] = tensor
            used.add(name)
    for i in range(config.n_layer):
        prefix = f"model.layers.{i}."
        for theirs, ours in BLOCK_NAMES.items():
            if prefix + theirs in tensors:
                state[f"h.{i}.{ours}"] = tensors[prefix + theirs]
                used.add(prefix + theirs)
        for ours, parts in FUSED.items():
            for kind in ("weight", "bias"):
                names = [f"{prefix}{part}.{kind}" for part in parts]
                if all(n in tensors for n in names):
                    state[f"h.{i}.{ours}.{kind}"] = torch.cat([tensors[n] for n in names], dim=0)
                    used.update(names)
    if config.tie_embeddings and "wte.weight" in state:
        state["lm_head.weight"] = state["wte.weight"]  # a stored head, if any, is the same tensor
    _check_names(state, sorted(set(tensors) - used), _expected_shapes(config))
    return {name: t.to(torch.float32).contiguous() for name, t in state.items()}


def _check_names(state: dict, unused: list[str], expected: dict[str, tuple]) -> None:
    missing = sorted(set(expected) - set(state))
    if missing or unused:
        raise AigcError(f"weights do not match this config.json (missing {missing[:3]}, unexpected {unused[:3]})")
    wrong = [f"{k} {tuple(state[k].shape)} != {v}" for k, v in expected.items() if tuple(state[k].shape) != v]
    if wrong:
        raise AigcError(f"weights have other shapes than config.json says: {'; '.join(wrong[:2])}")


def _check_exportable(config: ModelConfig) -> None:
    if family(config) != "Llama":
        raise AigcError(
            "only Llama-style runs (rmsnorm, rotary, swiglu) export as LlamaForCausalLM; "
            "GPT-2-style runs export as GPT2LMHeadModel"
        )
    if config.qkv_bias and config.bias:
        raise AigcError("--qkv-bias with --bias has no Hugging Face equivalent; train with one of them")


def hf_config_from(config: ModelConfig) -> dict:
    """config.json of a LlamaForCausalLM (Qwen2ForCausalLM when only q/k/v have biases) of our shape.
    Token ids (bos/eos/pad) are the tokenizer's business: the caller adds them."""
    _check_exportable(config)
    arch = "Qwen2ForCausalLM" if config.qkv_bias else "LlamaForCausalLM"
    hf = {
        "architectures": [arch],
        "model_type": MODEL_TYPES[arch],
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None,  # the 4.x spelling; 5.x reads it too
        "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    if arch == "LlamaForCausalLM":
        hf.update(attention_bias=config.bias, mlp_bias=config.bias)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=config.n_layer)
    return hf


def state_dict_to_hf(model_state: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> HF names (float32), q/k/v and gate/up split apart; no lm_head when tied.
    LoRA adapters must be merged first, and int8 weights cannot be exported."""
    _check_exportable(config)
    if any(".lora_" in name or name.endswith("weight_scale") for name in model_state):
        raise AigcError("the model holds LoRA adapters or int8 weights; merge (`aigc merge`) the fp32 run first")
    ours_to_hf = {v: k for k, v in TOP_NAMES.items()}
    splits = {
        "attn.c_attn": [config.n_embd, config.kv_heads * config.head_dim, config.kv_heads * config.head_dim],
        "mlp.c_fc": [config.ffn_size, config.ffn_size],
    }
    out = {}
    for name, tensor in model_state.items():
        tensor = tensor.detach().to(torch.float32)
        if name in ours_to_hf:
            if not (name == "lm_head.weight" and config.tie_embeddings):
                out[ours_to_hf[name]] = tensor.contiguous()
            continue
        _, layer, rest = name.split(".", 2)  # "h.N.rest"
        module, kind = rest.rsplit(".", 1)
        if module in FUSED:
            for part, piece in zip(FUSED[module], tensor.split(splits[module], dim=0)):
                out[f"model.layers.{layer}.{part}.{kind}"] = piece.contiguous()
        else:
            theirs = {v: k for k, v in BLOCK_NAMES.items()}[rest]
            out[f"model.layers.{layer}.{theirs}"] = tensor.contiguous()
    return out
