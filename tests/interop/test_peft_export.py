"""`aigc export --format peft`: the adapters read by peft's own loader over the exported base."""

from __future__ import annotations

import json

import pytest
import torch

from aigc.artifacts.run import RunConfig, Weights, save_run
from aigc.cli import main
from aigc.interop.peft_export import target_modules
from aigc.models import load_run
from aigc.models.lora import LoRASpec, apply_lora

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

LLAMA = dict(norm="rmsnorm", positions="rotary", mlp="swiglu", bias=False, n_head=4, n_kv_head=2)
ARCHS = {"llama": LLAMA, "qwen2": {**LLAMA, "qkv_bias": True}, "gpt2": {}}
TEXT = "Review 7: a wonderful film, 这部电影非常好看 😀  with  spaces\nand a new line"


def lora_run(make_run, tokenizer, tmp_path, overrides: dict, targets: tuple[str, ...]):
    """A LoRA run (base weights + adapters in one file) whose adapters are non-zero."""
    base = load_run(make_run("gpt", name="base", seed=3, **overrides))
    spec = LoRASpec(rank=2, alpha=6.0, targets=targets)
    apply_lora(base.model, spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in base.model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)
    config = RunConfig(model=base.config.model, data=base.config.data, weights=Weights("lora", lora=spec.to_json()))
    return save_run(tmp_path / "lora", config, tokenizer, base.model)


def peft_logits(out, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits of the base alone, logits of PeftModel over it) for `ids`."""
    base = transformers.AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32).eval()
    idx = torch.tensor([ids])
    with torch.no_grad():
        plain = base(idx).logits
        adapted = peft.PeftModel.from_pretrained(base, str(out)).eval()(idx).logits
    return plain, adapted


@pytest.mark.parametrize("arch", list(ARCHS))
def test_peft_model_gives_the_runs_logits(make_run, tiny_tokenizer, tmp_path, arch):
    run_dir = lora_run(make_run, tiny_tokenizer, tmp_path, ARCHS[arch], ("c_attn", "c_proj", "c_fc"))
    out = tmp_path / "peft"
    assert main(["export", str(run_dir), "--format", "peft", "--out", str(out)]) == 0
    ids = tiny_tokenizer.encode(TEXT)
    with torch.no_grad():
        ours = load_run(run_dir).model(torch.tensor([ids]))[0]
    plain, adapted = peft_logits(out, ids)
    assert (ours - adapted).abs().max().item() < 1e-4
    assert (plain - adapted).abs().max().item() > 1e-3  # the adapters were applied, not ignored
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (2, 6.0, "LORA")
    expected = ["c_attn", "c_fc", "c_proj"] if arch == "gpt2" else ["down_proj", "gate_proj", "k_proj", "o_proj"]
    assert config["target_modules"][: len(expected)] == expected


def test_peft_targets_name_modules_when_short_names_would_pick_more(make_run, tiny_tokenizer, tmp_path):
    """Only the attention's c_proj adapted: GPT-2's `c_proj` would also pick the MLP's, so full names."""
    run_dir = lora_run(make_run, tiny_tokenizer, tmp_path, {}, ("attn.c_proj",))
    out = tmp_path / "peft"
    assert main(["export", str(run_dir), "--format", "peft", "--out", str(out)]) == 0
    targets = json.loads((out / "adapter_config.json").read_text())["target_modules"]
    assert targets == ["transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj"]
    ids = tiny_tokenizer.encode(TEXT)
    with torch.no_grad():
        ours = load_run(run_dir).model(torch.tensor([ids]))[0]
    assert (ours - peft_logits(out, ids)[1]).abs().max().item() < 1e-4


def test_target_modules_prefers_short_names():
    linear = ["m.0.q_proj", "m.0.k_proj", "m.1.q_proj", "m.1.k_proj"]
    assert target_modules(["m.0.q_proj", "m.1.q_proj"], linear) == ["q_proj"]
    assert target_modules(["m.0.q_proj"], linear) == ["m.0.q_proj"]


def test_peft_export_refuses_a_run_without_adapters(make_run, tmp_path, capsys):
    assert main(["export", str(make_run("gpt")), "--format", "peft", "--out", str(tmp_path / "p")]) == 2
    assert "not LoRA adapters" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


def test_a_trained_lora_run_stored_apart_from_its_base_exports_as_peft_and_gguf(make_run, tmp_path):
    """The usual LoRA run: `aigc train --init-from BASE --lora-rank R` keeps only the adapters and
    names its base; both exports rebuild the adapted model from the two."""
    from test_gguf_export import hf_from_gguf  # the transformers GGUF loader of the GGUF tests
    from test_lora_train import _prepare  # a small recipes dataset on the base's tokenizer

    base_dir = make_run("gpt", name="base", seed=1, **LLAMA)
    data = _prepare(tmp_path, base_dir / "tokenizer.json", docs=60, val_fraction=0.1)
    train = ["train", "--data", str(data), "--init-from", str(base_dir), "--out", str(tmp_path / "lora")]
    options = "--lora-rank 4 --lora-alpha 8 --lora-targets c_attn,c_proj,c_fc --max-steps 4 --eval-every 4"
    options += " --eval-batches 1 --batch-size 4 --learning-rate 3e-2 --warmup-steps 1 --sample-tokens 0"
    assert main([*train, *options.split(), "--device", "cpu", "--dtype", "fp32", "--quiet"]) == 0
    run = load_run(tmp_path / "lora")
    assert run.config.weights.base == str(base_dir.resolve())
    ids = run.tokenizer.encode("Recipe 3: whisk 2 cups of flour")
    with torch.no_grad():
        ours = run.model(torch.tensor([ids]))[0]
    assert main(["export", str(tmp_path / "lora"), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    plain, adapted = peft_logits(tmp_path / "peft", ids)
    assert (ours - adapted).abs().max().item() < 1e-4 and (plain - adapted).abs().max().item() > 1e-4
    out = tmp_path / "gguf"
    assert main(["export", str(tmp_path / "lora"), "--format", "gguf", "--quant", "f32", "--out", str(out)]) == 0
    with torch.no_grad():
        theirs = hf_from_gguf(out / "model-f32.gguf")(torch.tensor([ids])).logits
    assert (ours - theirs).abs().max().item() < 1e-4
