"""LoRA adapters: start from the base model, count, merge exactly, save/load, and refuse bad targets."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from aigc.config import model_preset
from aigc.errors import AigcError
from aigc.models import build_model
from aigc.models.lora import (
    LoRALinear,
    LoRASpec,
    apply_lora,
    has_lora,
    load_adapters,
    merge_lora,
    parameter_counts,
    save_adapters,
    split_targets,
)


def _gpt(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(model_preset("tiny", vocab_size=300)).eval()


def _perturb_adapters(model: nn.Module) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.05)


IDX = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))  # (B, T)


def test_apply_lora_starts_from_the_base_model_and_freezes_it():
    model = _gpt()
    before, _ = model(IDX)  # autograd on: every layer takes the plain F.linear path, as LoRA's do
    apply_lora(model, LoRASpec(rank=4, alpha=8.0, targets=("c_attn", "c_proj")))
    after, _ = model(IDX)
    assert torch.equal(before, after)  # B starts at zero
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    # `c_proj` names both the attention and the MLP output projection: 3 layers per block, 2 blocks.
    assert wrapped == [f"h.{i}.{name}" for i in range(2) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_proj")]
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)


def test_parameter_counts_reports_trainable_and_total():
    model = _gpt()
    total = parameter_counts(model)["total"]
    apply_lora(model, LoRASpec(rank=2, alpha=2.0, targets=("c_fc",)))
    counts = parameter_counts(model)
    c = 64  # tiny preset width
    adapters = 2 * (2 * c + 2 * 4 * c)  # two layers: A (r, C) + B (4C, r)
    assert counts == {"trainable": adapters, "total": total + adapters}


def test_merge_lora_folds_adapters_exactly_into_plain_linears():
    model = _gpt()
    base_keys = set(model.state_dict())
    apply_lora(model, LoRASpec(rank=4, alpha=16.0))
    _perturb_adapters(model)
    with torch.no_grad():
        adapted, _ = model(IDX)
    merge_lora(model)
    assert not has_lora(model)
    assert set(model.state_dict()) == base_keys
    with torch.no_grad():
        merged, _ = model(IDX)
    assert (adapted - merged).abs().max().item() < 1e-5
    assert all(p.requires_grad for p in model.parameters())


def test_lora_keeps_base_weight_names_in_the_state_dict():
    model = _gpt()
    apply_lora(model, LoRASpec(rank=2, alpha=4.0))
    keys = set(model.state_dict())
    assert "h.0.attn.c_attn.weight" in keys and "h.0.attn.c_attn.lora_A" in keys


def test_save_and_load_adapters_round_trip(tmp_path):
    model = _gpt()
    spec = LoRASpec(rank=3, alpha=6.0, targets=("c_attn",))
    apply_lora(model, spec)
    _perturb_adapters(model)
    save_adapters(model, spec, tmp_path / "adapter.safetensors")
    fresh = _gpt()
    assert load_adapters(fresh, tmp_path / "adapter.safetensors") == spec
    with torch.no_grad():
        assert torch.equal(model(IDX)[0], fresh(IDX)[0])


def test_apply_lora_rejects_unknown_and_tied_targets():
    with pytest.raises(AigcError, match="q_proj not found; this model's linear layers: c_attn, c_fc, c_proj, lm_head"):
        apply_lora(_gpt(), LoRASpec(rank=2, alpha=2.0, targets=("q_proj",)))
    with pytest.raises(AigcError, match="tied to the token embedding"):
        apply_lora(_gpt(), LoRASpec(rank=2, alpha=2.0, targets=("lm_head",)))


def test_apply_lora_dotted_target_narrows_the_match():
    model = _gpt()
    apply_lora(model, LoRASpec(rank=2, alpha=2.0, targets=("attn.c_proj",)))
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    assert wrapped == ["h.0.attn.c_proj", "h.1.attn.c_proj"]


def test_apply_lora_to_lstm_targets_its_dense_layer():
    torch.manual_seed(0)
    model = build_model(model_preset("tiny", kind="lstm", vocab_size=300))
    apply_lora(model, LoRASpec(rank=2, alpha=2.0, targets=("dense",)))
    assert isinstance(model.dense, LoRALinear)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(rank=0, alpha=1.0), "--lora-rank must be >= 1"),
        (dict(rank=2, alpha=0.0), "--lora-alpha must be > 0"),
        (dict(rank=2, alpha=1.0, targets=()), "--lora-targets is empty"),
    ],
)
def test_lora_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(AigcError, match=message):
        LoRASpec(**kwargs)


def test_split_targets_accepts_commas_and_repeats():
    assert split_targets(["c_attn,c_proj", "c_fc", "c_attn"]) == ("c_attn", "c_proj", "c_fc")
