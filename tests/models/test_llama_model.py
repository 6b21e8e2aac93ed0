"""The GPT configured as a Llama-family model (RMSNorm, rotary, SwiGLU, GQA), and the GPT-2 defaults
that existing runs rely on: every feature the GPT has works for both."""

import pytest
import torch

from aigc.config import ModelConfig, SampleConfig, from_dict, model_preset
from aigc.generate import Request, generate
from aigc.models import GPT, build_model, packed
from aigc.models import gpt as gpt_module
from aigc.models.gpt import cached_rotary_tables, rotary_tables
from aigc.models.int8 import int8_state, load_int8_state, quantize_int8
from aigc.models.lora import LoRASpec, apply_lora, merge_lora

VOCAB = 50
LLAMAS = {
    "tied-gqa": {},
    "untied-mha": dict(tie_embeddings=False, n_kv_head=0),
    "qkv-bias": dict(qkv_bias=True),
}


def llama(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    return build_model(model_preset("llama-tiny", vocab_size=VOCAB, **overrides)).eval()


def test_gpt2_defaults_keep_the_module_names_and_shapes_of_existing_runs():
    """A config.json written before the Llama fields existed loads as GPT-2: same tensors, same shapes."""
    old_json = dict(kind="gpt", vocab_size=VOCAB, block_size=64, n_layer=1, n_head=2, n_embd=64, bias=True)
    model = GPT(from_dict(ModelConfig, old_json))
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected = {
        "wte.weight": (50, 64),
        "wpe.weight": (64, 64),
        "ln_f.weight": (64,),
        "ln_f.bias": (64,),
        "lm_head.weight": (50, 64),
    }
    for name, shape in {
        "ln_1": (64,),
        "ln_2": (64,),
        "attn.c_attn": (192, 64),
        "attn.c_proj": (64, 64),
        "mlp.c_fc": (256, 64),
        "mlp.c_proj": (64, 256),
    }.items():
        expected[f"h.0.{name}.weight"] = shape
        expected[f"h.0.{name}.bias"] = shape[:1]
    assert shapes == expected
    assert isinstance(model.h[0].ln_1, torch.nn.LayerNorm) and model.h[0].ln_1.eps == 1e-5


@pytest.mark.parametrize("variant", sorted(LLAMAS))
def test_llama_contract_logits_loss_and_counts(variant):
    model = llama(**LLAMAS[variant])
    assert not hasattr(model, "wpe") and isinstance(model.ln_f, torch.nn.RMSNorm)
    idx, targets = torch.randint(0, VOCAB, (2, 16)), torch.randint(0, VOCAB, (2, 16))
    logits, loss = model(idx, targets=targets)
    assert logits.shape == (2, 16, VOCAB)
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5
    tied = model.config.tie_embeddings
    assert (model.lm_head.weight.data_ptr() == model.wte.weight.data_ptr()) == tied
    tables = VOCAB * 64 * (1 if tied else 2)
    assert model.num_params() - model.num_params(non_embedding=True) == tables
    assert model.flops_per_token() > model.flops_per_token(training=False) > 0


def test_llama_cache_holds_only_the_shared_key_value_heads():
    model = llama()
    cache = model.new_cache(3)
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (3, 5)), cache=cache)
    assert cache.kv[0].shape == (2, 3, 2, 64, 16)  # (k/v, B, n_kv_head, capacity = block here, head_dim)


def test_cache_grows_on_demand_up_to_block_size_and_keeps_its_tokens(monkeypatch):
    monkeypatch.setattr(gpt_module, "FIRST_CAPACITY", 4)
    model = llama()
    idx = torch.randint(0, VOCAB, (2, 40))
    cache, chunks, capacities = model.new_cache(2), [], []
    assert cache.capacity == 0  # nothing allocated before the first forward
    with torch.no_grad():
        full, _ = model(idx)
        for start, end in [(0, 3), (3, 6), *((t, t + 1) for t in range(6, 40))]:
            chunks.append(model(idx[:, start:end], cache=cache)[0])
            capacities.append(cache.capacity)
    assert capacities[:3] == [4, 8, 8] and max(capacities) == 64 == model.config.block_size
    assert all(c >= e for c, e in zip(capacities, [3, 6, *range(7, 41)]))
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-4)


def test_rotary_table_of_a_cache_gives_the_rows_of_the_per_step_formula():
    config = llama().config
    cache = llama().new_cache(2)
    positions = torch.tensor([[0, 0, 1, 2], [5, 6, 7, 63]])  # (B, T), as left padding makes them
    cos, sin = cached_rotary_tables(cache, positions, config, torch.float32)
    table = cache.rope
    expected = rotary_tables(positions, config.head_dim, config.rope_theta, torch.float32)
    torch.testing.assert_close((cos, sin), expected, atol=1e-6, rtol=0)
    assert cos.shape == (2, 1, 4, config.head_dim)
    cached_rotary_tables(cache, positions[:, -1:], config, torch.float32)
    assert cache.rope is table  # computed once per cache, not per step


@pytest.mark.parametrize("variant", sorted(LLAMAS))
def test_llama_incremental_decoding_matches_full_forward(variant):
    model = llama(**LLAMAS[variant])
    idx = torch.randint(0, VOCAB, (3, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache(3)
        chunks = [model(idx[:, :7], cache=cache)[0], model(idx[:, 7:12], cache=cache)[0]]
        chunks += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-4)


def test_llama_left_padding_is_invisible_and_last_only_equals_the_last_row():
    model = llama()
    prompt = torch.randint(1, VOCAB, (1, 5))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt], dim=1)
    pad_mask = torch.tensor([[False] * 3 + [True] * 5])
    positions = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        reference, _ = model(prompt)
        out, _ = model(padded, cache=model.new_cache(1), positions=positions, pad_mask=pad_mask)
        last, _ = model(
            padded,
            cache=model.new_cache(1),
            positions=positions,
            pad_mask=pad_mask,
            last_only=True,
        )
    torch.testing.assert_close(out[:, 3:], reference, atol=1e-5, rtol=1e-4)
    assert last.shape == (1, 1, VOCAB)
    torch.testing.assert_close(last, out[:, -1:], atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="last_only"):
        model(prompt, targets=prompt, last_only=True)


def test_llama_batched_greedy_generation_equals_one_by_one(tiny_tokenizer):
    torch.manual_seed(0)
    model = build_model(model_preset("llama-tiny", vocab_size=tiny_tokenizer.vocab_size)).eval()
    greedy = SampleConfig(temperature=0, max_new_tokens=12)
    requests = [Request(p, config=greedy) for p in ("a wonderful film", "", "a much longer prompt than the others")]
    batched = generate(model, tiny_tokenizer, requests)
    for request, completion in zip(requests, batched):
        assert completion.token_ids == generate(model, tiny_tokenizer, [request])[0].token_ids
    assert len({c.token_ids for c in batched}) >= 2


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_packed_layers_fallback_gives_the_same_tokens(tiny_tokenizer, monkeypatch, preset):
    """With the oneDNN packed layers forced off, the plain nn.Linear path decodes the same tokens."""
    torch.manual_seed(0)
    model = build_model(model_preset(preset, vocab_size=tiny_tokenizer.vocab_size)).eval()
    requests = [Request(p, config=SampleConfig(temperature=0, max_new_tokens=16)) for p in ("a film", "")]
    packed_tokens = [c.token_ids for c in generate(model, tiny_tokenizer, requests)]
    calls = []
    monkeypatch.setattr(packed, "onednn_linear_available", lambda: calls.append(1) and False)
    plain_tokens = [c.token_ids for c in generate(model, tiny_tokenizer, requests)]
    assert calls and plain_tokens == packed_tokens


def test_llama_lora_trains_only_adapters_and_merges_exactly():
    model = llama(tie_embeddings=False).train()
    apply_lora(model, LoRASpec(rank=4, alpha=8))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    idx = torch.randint(0, VOCAB, (2, 16))
    for _ in range(3):
        optimizer.zero_grad()
        model(idx, targets=idx)[1].backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        adapted, _ = model(idx)
        merge_lora(model)
        merged, _ = model(idx)
    assert not torch.allclose(adapted, llama(tie_embeddings=False)(idx)[0])  # the adapters learned
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_llama_int8_is_close_and_reloads_exactly(tie):
    model = llama(tie_embeddings=tie)
    quantized = quantize_int8(model)
    state = int8_state(quantized)
    assert ("wte.weight" in state) != tie  # a tied head is stored once, as int8
    reloaded = quantize_int8(llama(seed=1, tie_embeddings=tie))
    load_int8_state(reloaded, state, "test")
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        fp32, int8, again = model(idx)[0], quantized(idx)[0], reloaded(idx)[0]
    assert 0 < (fp32 - int8).abs().max() < 0.05 * fp32.abs().max()
    assert torch.equal(again, int8)
