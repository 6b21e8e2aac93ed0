"""`aigc train --init-from QUANT_RUN --lora-rank R` (QLoRA): the same commands as over a float base.
The base stays in its blocks, the run stores only adapters and new label rows plus the hash-checked
reference, and resume, generate, merge and export take the result."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import save_imported_base, write_csv

from aigc.artifacts.state import load_state
from aigc.cli import main
from aigc.models import load_run
from aigc.models.kinds import describe
from aigc.models.lora import QuantLoRALinear, has_lora
from aigc.models.qlayers import quantised_weights
from aigc.models.vocab import GrownQuantEmbedding

TRAIN = "--max-steps 12 --eval-every 4 --eval-batches 2 --seq-len 32 --learning-rate 1e-2 --device cpu --dtype fp32"


@pytest.fixture
def quantised_base(tmp_path, reviews):
    """A tiny Llama-shaped run that looks imported (so LoRA is the default), exported as Q4_0."""
    fp32 = save_imported_base(tmp_path / "fp32", reviews)
    assert main(["export", str(fp32), "--format", "q4", "--out", str(tmp_path / "q4")]) == 0
    return tmp_path / "q4"


@pytest.fixture
def labelled_data(tmp_path, reviews, quantised_base):
    """Labelled reviews over the base's tokenizer: prepare appends <|pos|> and <|neg|>, so training grows
    the quantised table by two float rows."""
    data = tmp_path / "data"
    prepare = ["prepare", write_csv(tmp_path / "r.csv", reviews), "--out", str(data), "--label-column", "label"]
    assert main([*prepare, "--tokenizer", str(quantised_base), "--no-dedup", "--val-fraction", "0.1"]) == 0
    return data


def train(base, data, out, *options: str) -> int:
    command = ["train", "--init-from", str(base), "--data", str(data), "--out", str(out), *TRAIN.split()]
    return main([*command, *options, "--sample-tokens", "0", "--quiet"])


def test_lora_on_a_quantised_base_learns_stores_only_what_trains_resumes_and_generates(
    quantised_base, labelled_data, tmp_path
):
    out = tmp_path / "qlora"
    base_digest = hashlib.sha256((quantised_base / "model.safetensors").read_bytes()).hexdigest()
    # Windows anywhere, like the validation windows: this checks that the adapters learn at all (document
    # windows, the default for labelled data, train on the reviews' openings only: 5.94 -> 5.94 here).
    assert train(quantised_base, labelled_data, out, "--lora-rank", "8", "--windows", "anywhere") == 0
    val = [json.loads(line)["val_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(val) == 3 and val[-1] < val[0] - 0.05, val  # measured: 5.92 -> 5.76 nats, steps 4 -> 12

    config = json.loads((out / "config.json").read_text())
    saved, counts = config["weights"], config["extra"]["parameters"]
    assert (saved["format"], saved["base"], saved["base_sha256"]) == (
        "lora",
        str(quantised_base.resolve()),
        base_digest,
    )
    stored = load_file(out / "model.safetensors")
    assert set(stored) == {"wte.new_rows"} | {n for n in stored if ".lora_" in n}  # no base weight at all
    assert stored["wte.new_rows"].shape == (2, 64)
    assert counts["trainable"] == sum(t.numel() for t in stored.values())
    assert counts["total"] == describe(load_run(quantised_base).model).parameters + counts["trainable"]  # blocks too
    assert set(load_state(out)["model"]) == set(stored)
    assert hashlib.sha256((quantised_base / "model.safetensors").read_bytes()).hexdigest() == base_digest

    tuned = load_run(out).model  # the base as it is stored: blocks, memory-mapped
    assert isinstance(tuned.h[0].attn.c_attn, QuantLoRALinear) and isinstance(tuned.wte, GrownQuantEmbedding)
    assert quantised_weights(tuned) > 0
    assert tuned.wte.num_embeddings == load_run(quantised_base).model.wte.num_embeddings + 2
    assert main(["generate", str(out), "--label", "pos", "--max-new-tokens", "4", "--seed", "1"]) == 0

    assert main(["train", "--resume", str(out), "--max-steps", "14", "--quiet"]) == 0
    resumed = load_file(out / "model.safetensors")
    assert resumed.keys() == stored.keys()
    assert not torch.equal(resumed["h.0.attn.c_attn.lora_B"], stored["h.0.attn.c_attn.lora_B"])


def test_full_finetuning_of_a_quantised_base_is_refused_in_one_line(quantised_base, labelled_data, tmp_path, capsys):
    assert train(quantised_base, labelled_data, tmp_path / "full", "--lora-rank", "0") == 2
    err = capsys.readouterr().err.strip()
    assert "block-quantised weights" in err and "--lora-rank R" in err and "--dequantize" in err
    assert "\n" not in err and not (tmp_path / "full").exists()


def test_merge_and_exports_dequantise_the_base_and_fold_the_adapters_in(
    quantised_base, labelled_data, tmp_path, float_products
):
    out = tmp_path / "qlora"
    assert train(quantised_base, labelled_data, out, "--lora-rank", "4", "--max-steps", "4") == 0
    tuned = load_run(out)
    idx = torch.tensor([[tuned.tokenizer.label_id("neg"), 5, 17, 42, 99, 7]])  # (1, T)
    with torch.no_grad():
        before = tuned.model(idx)[0]

    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = load_run(tmp_path / "merged")
    assert merged.config.weights.format == "full" and not has_lora(merged.model)
    assert quantised_weights(merged.model) == 0
    with torch.no_grad():
        torch.testing.assert_close(merged.model(idx)[0], before, rtol=1e-4, atol=1e-4)

    assert main(["export", str(out), "--format", "peft", "--out", str(tmp_path / "peft")]) == 0
    adapters = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert adapters and all(".lora_" in name for name in adapters)
    base = load_file(tmp_path / "peft" / "base" / "model.safetensors")
    assert base["model.embed_tokens.weight"].dtype == torch.float32  # the blocks expanded for transformers

    assert main(["export", str(out), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 0
    assert main(["export", str(out), "--format", "q8_0", "--out", str(tmp_path / "q8")]) == 0
    assert load_run(tmp_path / "q8").config.weights.format == "quantized"


def test_a_gpt2_shaped_qlora_run_exports_as_a_hugging_face_folder(make_run, reviews, tmp_path):
    """GPT-2's shape (biases, learned positions) over Q8_0 blocks: the hf export merges as for a float base."""
    assert main(["export", str(make_run(name="gpt2")), "--format", "q8_0", "--out", str(tmp_path / "q8")]) == 0
    data = tmp_path / "data"
    prepare = ["prepare", write_csv(tmp_path / "r.csv", reviews), "--out", str(data), "--label-column", "label"]
    assert main([*prepare, "--tokenizer", str(tmp_path / "q8"), "--no-dedup", "--val-fraction", "0.1"]) == 0
    assert train(tmp_path / "q8", data, tmp_path / "tuned", "--lora-rank", "2", "--max-steps", "2") == 0
    assert main(["export", str(tmp_path / "tuned"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    assert tensors["transformer.h.0.attn.c_attn.weight"].dtype == torch.float32
