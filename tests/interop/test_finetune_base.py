"""Fine-tuning an imported (pretrained) Llama-style base on labelled data: prepare appends the label
tokens to the base's tokenizer, training grows the embedding, LoRA is the default, and only the
adapters and the new rows train and are stored; merge folds both in."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tests.conftest import save_imported_base, write_csv

from aigc.cli import main
from aigc.models import load_run
from aigc.models.adapted import load_base
from aigc.models.lora import LoRASpec, apply_lora, has_lora
from aigc.models.vocab import grow_frozen, initial_rows

TRAIN = "--max-steps 12 --eval-every 12 --eval-batches 1 --seq-len 32 --learning-rate 1e-2 --device cpu --dtype fp32"


@pytest.fixture
def imported_base(tmp_path, reviews):
    """A tiny Llama-shaped run that looks imported: no labels, `extra.imported_from` set."""
    return save_imported_base(tmp_path / "base", reviews)


@pytest.fixture
def labelled_data(tmp_path, reviews, imported_base):
    data = tmp_path / "data"
    prepare = ["prepare", write_csv(tmp_path / "r.csv", reviews), "--out", str(data), "--label-column", "label"]
    assert main([*prepare, "--tokenizer", str(imported_base), "--no-dedup", "--val-fraction", "0.1"]) == 0
    return data


def test_lora_is_the_default_for_an_imported_base_and_trains_only_adapters_and_new_rows(
    imported_base, labelled_data, tmp_path
):
    out = tmp_path / "tuned"
    assert (
        main(
            ["train", "--init-from", str(imported_base), "--data", str(labelled_data), "--out", str(out)]
            + TRAIN.split()
            + ["--quiet"]
        )
        == 0
    )
    saved = json.loads((out / "config.json").read_text())
    base_vocab = load_run(imported_base).config.model.vocab_size
    assert saved["weights"]["format"] == "lora" and saved["weights"]["lora"]["rank"] == 16
    assert saved["model"]["vocab_size"] == base_vocab + 2
    stored = load_file(out / "model.safetensors")
    assert stored["wte.new_rows"].shape == (2, 64)
    assert all(".lora_" in name for name in stored if name != "wte.new_rows")

    tuned, base = load_run(out), load_run(imported_base)
    assert has_lora(tuned.model) and tuned.model.wte.num_embeddings == base_vocab + 2
    assert torch.equal(tuned.model.wte.weight[:base_vocab], base.model.wte.weight)  # the base rows are frozen
    start = initial_rows(base.model.wte.weight, tuned.tokenizer, range(base_vocab, base_vocab + 2))
    assert not torch.allclose(stored["wte.new_rows"], start)  # the new rows trained
    assert main(["generate", str(out), "--label", "pos", "--max-new-tokens", "4", "--seed", "1"]) == 0

    idx = torch.tensor([[tuned.tokenizer.label_id("pos"), 5, 17, 42, 99]])  # (1, T)
    with torch.no_grad():
        before = tuned.model(idx)[0]
    assert main(["merge", str(out), "--out", str(tmp_path / "merged")]) == 0
    merged = load_run(tmp_path / "merged")
    assert merged.config.weights.format == "full" and not has_lora(merged.model)
    with torch.no_grad():
        assert (merged.model(idx)[0] - before).abs().max().item() < 1e-5


def test_a_lora_run_with_grown_label_rows_exports_as_gguf(imported_base, labelled_data, tmp_path):
    """The loaded model's config counts the grown rows: GGUF's vocabulary is checked against it."""
    out = tmp_path / "tuned"
    command = ["train", "--init-from", str(imported_base), "--data", str(labelled_data), "--out", str(out)]
    assert main([*command, *TRAIN.split(), "--max-steps", "2", "--quiet"]) == 0
    assert load_run(out).model.config.vocab_size == load_run(imported_base).config.model.vocab_size + 2
    assert main(["export", str(out), "--format", "gguf", "--out", str(tmp_path / "gguf")]) == 0


def test_full_finetune_on_request_grows_a_plain_embedding(imported_base, labelled_data, tmp_path):
    out = tmp_path / "full"
    command = ["train", "--init-from", str(imported_base), "--data", str(labelled_data), "--out", str(out)]
    assert main([*command, "--lora-rank", "0", *TRAIN.split(), "--quiet"]) == 0
    tuned = load_run(out)
    assert tuned.config.weights.format == "full" and not has_lora(tuned.model)
    assert tuned.model.wte.num_embeddings == load_run(imported_base).config.model.vocab_size + 2


def test_frozen_base_gets_no_gradients(imported_base):
    _, model = load_base(str(imported_base), None)
    apply_lora(model, LoRASpec(rank=4, alpha=8.0))
    vocab = model.wte.num_embeddings
    grow_frozen(model, torch.zeros(2, 64))
    idx = torch.tensor([[vocab, 3, 4, 5, vocab + 1, 6]])  # (1, T): both new tokens occur
    _, loss = model(idx, torch.roll(idx, -1, 1))
    loss.backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"wte.new_rows"} | {n for n, _ in model.named_parameters() if ".lora_" in n}
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (name in trainable), name
    assert model.wte.new_rows.grad.abs().sum(1).gt(0).all()  # both rows, as input and as output
