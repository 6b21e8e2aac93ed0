"""Hugging Face export/import: exact parity with `transformers`, round trips, and bad input."""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from aigc.cli import main  # noqa: E402
from aigc.config import LLAMA_STYLE, SampleConfig  # noqa: E402
from aigc.generate import Request, generate  # noqa: E402
from aigc.models import load_run  # noqa: E402

TEXT = "<|pos|>Review 7: a wonderful film, 这部电影非常好看 😀  with  spaces\nand a new line"


def _hf_logits(folder, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(idx).logits


@pytest.fixture
def exported(make_run, tmp_path):
    run_dir = make_run("gpt", seed=3)
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    return run_dir, tmp_path / "hf"


def test_export_hf_logits_match_transformers(exported):
    run_dir, hf_dir = exported
    run = load_run(run_dir)
    idx = torch.tensor([run.tokenizer.encode(TEXT)])  # (1, T)
    with torch.no_grad():
        ours, _ = run.model(idx)
    theirs = _hf_logits(hf_dir, idx)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_export_hf_greedy_text_matches_transformers(exported):
    run_dir, hf_dir = exported
    run = load_run(run_dir)
    config = SampleConfig(temperature=0.0, max_new_tokens=24)
    ours = generate(run.model, run.tokenizer, [Request(prompt="Review 1: a", label="pos", config=config)])[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    # aigc starts every context with <|endoftext|> then the label token, as documents are laid out in training.
    prompt = tokenizer(tokenizer.eos_token + "<|pos|>Review 1: a", return_tensors="pt").input_ids
    out = model.generate(prompt, do_sample=False, max_new_tokens=24)  # suppress_tokens from generation_config
    new = out[0, prompt.shape[1] :].tolist()
    assert tuple(new) == ours.token_ids
    assert tokenizer.decode(new, skip_special_tokens=True) == ours.text


def test_export_hf_tokenizer_matches_ours(exported):
    run_dir, hf_dir = exported
    ours = load_run(run_dir).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert theirs(TEXT).input_ids == ours.encode(TEXT)
    assert theirs.decode(ours.encode(TEXT)) == TEXT
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eot_id, ours.pad_id)
    assert {"<|pos|>", "<|neg|>"} <= set(theirs.all_special_tokens)
    assert len(theirs) == ours.vocab_size


def test_export_hf_writes_config_card_and_generation_config(exported):
    run_dir, hf_dir = exported
    run = load_run(run_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["activation_function"] == "gelu_new"
    assert config["n_positions"] == config["n_ctx"] == run.config.model.block_size
    assert config["eos_token_id"] == config["bos_token_id"] == run.tokenizer.eot_id
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert run.tokenizer.pad_id in generation["suppress_tokens"]
    card = (hf_dir / "README.md").read_text()
    assert "## Data" in card and "## Size" in card and f"{run.model.num_params():,}" in card
    assert "pos, neg" in card


def test_export_hf_refuses_a_non_empty_folder(make_run, tmp_path, capsys):
    run_dir = make_run("gpt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "taken")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "taken" / "notes.txt").read_text() == "keep me"


def test_export_hf_lstm_run_is_refused(make_run, tmp_path, capsys):
    run_dir = make_run("lstm")
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "LSTM" in err and "no GPT-2 equivalent" in err
    assert not (tmp_path / "hf").exists()


def test_export_hf_without_biases_writes_zero_biases(make_run, tmp_path):
    run_dir = make_run("gpt", bias=False)
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    run = load_run(run_dir)
    idx = torch.tensor([run.tokenizer.encode(TEXT)])
    with torch.no_grad():
        ours, _ = run.model(idx)
    assert (ours - _hf_logits(tmp_path / "hf", idx)).abs().max().item() < 1e-4


def test_export_hf_files_are_readable_by_other_users(make_run, tmp_path):
    previous = os.umask(0o022)
    try:
        assert main(["export", str(make_run("gpt")), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {0o644}, modes  # not the 0600 of a temp file


def test_export_hf_card_reports_training_metrics(make_run, tmp_path):
    from aigc.fsutil import append_jsonl

    run_dir = make_run("gpt")
    append_jsonl(run_dir / "metrics.jsonl", {"step": 100, "tokens": 51200, "val_loss": 4.5, "val_bpb": 1.9})
    append_jsonl(run_dir / "metrics.jsonl", {"step": 200, "tokens": 102400, "val_loss": 4.75, "val_bpb": 2.0})
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| training tokens | 102,400 |" in card and "| optimizer steps | 200 |" in card
    assert "| best val_loss | 4.5 |" in card and "| val_bpb | 2 |" in card


def test_export_hf_of_a_llama_run_names_options_that_exist(make_run, tmp_path, capsys):
    run_dir = make_run("gpt", name="llama", **LLAMA_STYLE)
    assert main(["export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "`aigc export --format int8`" in err and "export it as Llama" not in err
    assert main(["export", str(run_dir), "--format", "int8", "--out", str(tmp_path / "int8")]) == 0  # the named way
