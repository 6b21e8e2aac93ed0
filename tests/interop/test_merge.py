"""`aigc merge`: fold adapters into the weights, in place or into a new run; keep the adapters."""

from __future__ import annotations

import pytest
import torch

from aigc.artifacts.run import RunConfig, Weights, save_run
from aigc.cli import main
from aigc.models import load_run
from aigc.models.lora import LoRASpec, apply_lora, has_lora, load_adapters

SPEC = LoRASpec(rank=2, alpha=4.0, targets=("c_attn", "c_fc"))
IDX = torch.tensor([[0, 5, 17, 42, 99, 7, 3]])  # (1, T)


@pytest.fixture
def lora_run(make_run, tiny_tokenizer, tmp_path):
    """A run whose weights file holds base weights plus trained-looking (non-zero) adapters."""
    base = load_run(make_run("gpt", name="base"))
    apply_lora(base.model, SPEC)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in base.model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)
    config = RunConfig(model=base.config.model, data=base.config.data, weights=Weights("lora", lora=SPEC.to_json()))
    run_dir = save_run(tmp_path / "lora", config, tiny_tokenizer, base.model)
    with torch.no_grad():
        return run_dir, base.model(IDX)[0]


def test_merge_into_a_new_run_keeps_outputs_and_adapters(lora_run, make_run, tmp_path):
    run_dir, adapted = lora_run
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "merged")]) == 0
    merged = load_run(tmp_path / "merged")
    assert not has_lora(merged.model)
    assert merged.config.extra["merged_lora"] == SPEC.to_json() and merged.config.weights.format == "full"
    with torch.no_grad():
        assert (merged.model(IDX)[0] - adapted).abs().max().item() < 1e-5
    assert has_lora(load_run(run_dir).model)  # the source run is untouched
    base = load_run(make_run("gpt", name="base"))  # adapters alone re-apply to the base run
    assert load_adapters(base.model, tmp_path / "merged" / "adapter.safetensors") == SPEC
    with torch.no_grad():
        assert torch.equal(base.model(IDX)[0], adapted)


def test_merge_in_place(lora_run):
    run_dir, adapted = lora_run
    assert main(["merge", str(run_dir)]) == 0
    merged = load_run(run_dir)
    assert not has_lora(merged.model) and (run_dir / "adapter.safetensors").is_file()
    with torch.no_grad():
        assert (merged.model(IDX)[0] - adapted).abs().max().item() < 1e-5


def test_merge_refuses_a_run_without_adapters(make_run, capsys):
    run_dir = make_run("gpt")
    assert main(["merge", str(run_dir)]) == 2
    assert "has no LoRA adapters" in capsys.readouterr().err
