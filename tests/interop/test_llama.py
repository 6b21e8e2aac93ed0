"""Llama-family checkpoints <-> our GPT: logits equal to `transformers` for full forwards, for
left-padded KV-cache decoding, and after a round trip ours -> HF -> transformers."""

import dataclasses

import pytest
import torch

from aigc.config import model_preset
from aigc.errors import AigcError
from aigc.interop.llama import (
    hf_config_from,
    model_config_from_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from aigc.models import GPT

transformers = pytest.importorskip("transformers")

VOCAB = 97
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
CASES = {
    "llama-tied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=4, tie_word_embeddings=True),
    ),
    "llama-gqa-untied": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=2, rope_theta=500.0),
    ),
    "llama-bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True),
    ),
    "qwen2-qkv-bias": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(num_key_value_heads=2, tie_word_embeddings=True),
    ),
    "mistral-gqa": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(num_key_value_heads=2, sliding_window=None),
    ),
}


def hf_model(case: str):
    config_cls, arch, extra = CASES[case]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**SHAPE, **extra, architectures=[arch], attn_implementation="eager")
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # the default init (std 0.02, zero biases) gives near-uniform logits: widen it
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.2)
    return model


def ours_from(hf) -> GPT:
    config = model_config_from_hf(hf.config.to_dict())
    model = GPT(config).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), config))
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_llama_import_gives_transformers_logits(case):
    hf = hf_model(case)
    ours = ours_from(hf)
    idx = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    assert expected.std() > 0.1  # logits that actually discriminate, so equality means something
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", ["llama-gqa-untied", "qwen2-qkv-bias"])
def test_llama_left_padded_cache_decode_matches_transformers_per_row(case):
    """Rows of different lengths, left-padded into one batch: prefill then 4 single-token steps; each
    row's logits equal transformers' full forward over that row alone (rotary uses per-row positions)."""
    hf = hf_model(case)
    ours = ours_from(hf)
    gen = torch.Generator().manual_seed(2)
    rows = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (9, 4, 6)]
    fed = torch.randint(0, VOCAB, (3, 4), generator=gen)  # tokens fed one step at a time
    width = max(len(r) for r in rows)
    idx = torch.zeros(3, width, dtype=torch.long)
    pad_mask = torch.zeros(3, width, dtype=torch.bool)
    for i, r in enumerate(rows):
        idx[i, width - len(r) :], pad_mask[i, width - len(r) :] = r, True
    positions = (pad_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = ours.new_cache(3)
        steps = [ours(idx, cache=cache, positions=positions, pad_mask=pad_mask, last_only=True)[0]]
        following = positions[:, -1:] + 1
        for t in range(fed.shape[1]):
            steps.append(ours(fed[:, t : t + 1], cache=cache, positions=following)[0])
            following = following + 1
        got = torch.cat(steps, dim=1)  # (3, 5, V): after the prompt, then after each fed token
        for i, r in enumerate(rows):
            full = hf(torch.cat([r, fed[i]]).unsqueeze(0)).logits[0, len(r) - 1 :]  # (5, V)
            torch.testing.assert_close(got[i], full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=False), dict(qkv_bias=True), dict(n_kv_head=1)])
def test_llama_export_round_trip_gives_our_logits_in_transformers(overrides):
    torch.manual_seed(0)
    config = model_preset("llama-tiny", vocab_size=VOCAB, **overrides)
    ours = GPT(config).eval()
    hf_dict = hf_config_from(config)
    hf_config = transformers.AutoConfig.for_model(hf_dict.pop("model_type"), **hf_dict)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(ours.state_dict(), config), strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if config.tie_embeddings else set())
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == config.tie_embeddings
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], atol=1e-4, rtol=1e-4)
    back = model_config_from_hf(hf.config.to_dict(), block_size=config.block_size)
    assert back.ffn_size == config.ffn_size  # ours says 0 = default, the HF config the number
    assert dataclasses.replace(back, ffn_hidden=0, hidden_size=config.hidden_size) == config


def test_llama_import_refuses_what_it_cannot_reproduce():
    good = {**SHAPE, "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(AigcError, match="LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM"):
        model_config_from_hf({**good, "architectures": ["FalconForCausalLM"]})
    with pytest.raises(AigcError, match="rope scaling 'llama3'"):
        model_config_from_hf({**good, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
    with pytest.raises(AigcError, match="rope scaling 'yarn'"):
        model_config_from_hf({**good, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    with pytest.raises(AigcError, match="hidden_act"):
        model_config_from_hf({**good, "hidden_act": "gelu"})
    with pytest.raises(AigcError, match="block_size 128 exceeds"):
        model_config_from_hf(good, block_size=128)
    config = model_config_from_hf(good)
    tensors = state_dict_to_hf(GPT(config).state_dict(), config)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(AigcError, match="missing"):
        state_dict_from_hf(tensors, config)


def test_gpt2_style_run_is_not_exported_as_llama():
    with pytest.raises(AigcError, match="GPT2LMHeadModel"):
        hf_config_from(model_preset("tiny", vocab_size=VOCAB))
