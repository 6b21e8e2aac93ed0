"""int8 export: close to fp32, smaller on disk, reloads exactly, and every run reader can open it."""

from __future__ import annotations

import json

import pytest
import torch

from aigc.artifacts.run import RunConfig, Weights, save_run
from aigc.cli import main
from aigc.config import SampleConfig
from aigc.generate import Request, generate
from aigc.models import load_run
from aigc.models.int8 import Int8Linear, int8_state, quantize_int8
from aigc.models.lora import LoRASpec, apply_lora


def _logits(model, tokenizer, text: str = "<|pos|>Review 4: one of the best movies of the year") -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer.encode(text)]))[0]  # (1, T, V)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_quantize_int8_stays_close_to_fp32(make_run, kind):
    run = load_run(make_run(kind, seed=2))
    quantized = quantize_int8(run.model)
    assert any(isinstance(m, Int8Linear) for m in quantized.modules())
    assert not any(isinstance(m, Int8Linear) for m in run.model.modules())  # original untouched
    fp32, int8 = _logits(run.model, run.tokenizer), _logits(quantized, run.tokenizer)
    scale = fp32.abs().max().item()
    assert (fp32 - int8).abs().max().item() < 0.05 * scale
    assert (fp32 - int8).abs().max().item() > 0  # it really is quantized


def test_quantize_int8_shares_one_int8_matrix_for_the_tied_head(make_run):
    run = load_run(make_run("gpt"))
    quantized = quantize_int8(run.model)
    state = int8_state(quantized)
    assert state["lm_head.weight"].dtype == torch.int8 and "wte.weight" not in state
    head = state["lm_head.weight"].float() * state["lm_head.weight_scale"].unsqueeze(1)  # (V, C)
    assert torch.equal(quantized.wte.weight, head)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_export_int8_reloads_exactly_and_is_smaller(make_run, tmp_path, kind):
    run_dir = make_run(kind, seed=4)
    out = tmp_path / f"int8-{kind}"
    assert main(["export", str(run_dir), "--format", "int8", "--out", str(out)]) == 0
    run, loaded = load_run(run_dir), load_run(out)
    expected = _logits(quantize_int8(run.model), run.tokenizer)
    assert torch.equal(_logits(loaded.model, loaded.tokenizer), expected)
    assert loaded.config.weights.format == "int8"
    assert loaded.config.weights.quantization["method"] == "int8-per-token"
    size_fp32, size_int8 = (run_dir / "model.safetensors").stat().st_size, (out / "model.safetensors").stat().st_size
    # The GPT is almost all linear weights (4 bytes -> 1); the LSTM keeps its recurrent weights in fp32.
    assert size_int8 < (0.35 if kind == "gpt" else 0.9) * size_fp32


def test_export_int8_run_generates_text(make_run, tmp_path):
    out = tmp_path / "int8"
    assert main(["export", str(make_run("gpt")), "--format", "int8", "--out", str(out)]) == 0
    run = load_run(out)
    config = SampleConfig(temperature=0.8, max_new_tokens=12, seed=1)
    completions = generate(run.model, run.tokenizer, [Request("Review", label="neg", config=config)] * 2)
    assert [c.token_ids for c in completions][0] == completions[1].token_ids
    assert len(completions[0].token_ids) >= 1


def test_export_int8_folds_lora_adapters_in(make_run, tiny_tokenizer, tmp_path):
    base = load_run(make_run("gpt"))
    spec = LoRASpec(rank=2, alpha=4.0, targets=("c_attn",))
    apply_lora(base.model, spec)
    with torch.no_grad():
        for name, param in base.model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)
    config = RunConfig(model=base.config.model, data=base.config.data, weights=Weights("lora", lora=spec.to_json()))
    save_run(tmp_path / "lora", config, tiny_tokenizer, base.model)
    assert main(["export", str(tmp_path / "lora"), "--format", "int8", "--out", str(tmp_path / "q")]) == 0
    loaded = load_run(tmp_path / "q")
    assert loaded.config.weights.lora is None and loaded.config.extra["merged_lora"] == spec.to_json()
    expected = _logits(base.model, tiny_tokenizer)
    assert (_logits(loaded.model, tiny_tokenizer) - expected).abs().max().item() < 0.05 * expected.abs().max().item()


@pytest.mark.parametrize("fmt", ["hf", "int8"])
def test_export_of_an_int8_run_is_refused(make_run, tmp_path, capsys, fmt):
    run_dir = make_run("gpt")
    assert main(["export", str(run_dir), "--format", "int8", "--out", str(tmp_path / "int8")]) == 0
    assert main(["export", str(tmp_path / "int8"), "--format", fmt, "--out", str(tmp_path / "again")]) == 2
    assert f"is already int8 (dynamically quantized); export {run_dir.resolve()} instead" in capsys.readouterr().err
    assert not (tmp_path / "again").exists()


def test_load_int8_rejects_mismatched_weights(make_run, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["export", str(make_run("gpt")), "--format", "int8", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["model"]["n_layer"] = 3
    (out / "config.json").write_text(json.dumps(config))
    assert main(["generate", str(out), "--prompt", "Review", "--max-new-tokens", "2"]) == 2
    assert "do not match the model in config.json" in capsys.readouterr().err
