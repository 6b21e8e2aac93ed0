"""`aigc import`: a randomly initialised transformers GPT-2 (made here, no downloads) becomes a run."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

transformers = pytest.importorskip("transformers")

from aigc.cli import main  # noqa: E402
from aigc.config import SampleConfig  # noqa: E402
from aigc.generate import Request, generate  # noqa: E402
from aigc.models import load_run  # noqa: E402
from aigc.tokenizer import EOT, PAD  # noqa: E402


def _save_hf_gpt2(folder, hf_tokenizer: HFTokenizer, vocab_size: int, seed: int = 0, **config) -> torch.nn.Module:
    """A tiny random GPT2LMHeadModel plus its tokenizer, saved the way the hub stores them."""
    torch.manual_seed(seed)
    hf_config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=hf_tokenizer.token_to_id(EOT), eos_token_id=hf_tokenizer.token_to_id(EOT), **config,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(hf_config).eval()
    with torch.no_grad():  # random LayerNorm and biases too, so a transposed or dropped tensor shows
        for name, param in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")) or name.endswith(".bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer, eos_token=EOT, bos_token=EOT)
    wrapped.save_pretrained(folder)
    return model


def _ids(text: str, tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text)])  # (1, T)


def test_import_hf_round_trip_keeps_logits(tiny_tokenizer, tmp_path):
    hf_model = _save_hf_gpt2(tmp_path / "hf", tiny_tokenizer.hf, tiny_tokenizer.vocab_size)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run")
    idx = _ids("<|neg|>Review 3: a boring film 这部电影太无聊了", run.tokenizer)
    with torch.no_grad():
        reference = hf_model(idx).logits
        ours, _ = run.model(idx)
    assert (ours - reference).abs().max().item() < 1e-5
    assert run.labels == ("pos", "neg")
    assert run.config.extra["imported_from"]["added_pad_token"] is False

    assert main(["export", str(tmp_path / "run"), "--format", "hf", "--out", str(tmp_path / "again")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(idx).logits, reference)
    completion = generate(
        run.model, run.tokenizer, [Request("Review", config=SampleConfig(temperature=0, max_new_tokens=5))]
    )
    assert len(completion[0].token_ids) >= 1


def _plain_gpt2_tokenizer(reviews) -> HFTokenizer:
    """A byte-level BPE with only <|endoftext|>, like GPT-2's own: no padding token."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator((text for text, _ in reviews), trainer=trainer)
    return hf


def test_import_hf_adds_pad_token_and_one_mean_row(reviews, tmp_path):
    hf_tokenizer = _plain_gpt2_tokenizer(reviews)
    vocab = hf_tokenizer.get_vocab_size()
    hf_model = _save_hf_gpt2(tmp_path / "hf", hf_tokenizer, vocab)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run")
    assert run.tokenizer.pad_id == vocab and run.config.model.vocab_size == vocab + 1
    assert run.tokenizer.hf.id_to_token(run.tokenizer.pad_id) == PAD
    idx = _ids("Review 12: one of the best movies", run.tokenizer)
    with torch.no_grad():
        reference = hf_model(idx).logits  # (1, T, V)
        ours, _ = run.model(idx)  # (1, T, V + 1)
    assert (ours[..., :vocab] - reference).abs().max().item() < 1e-5
    pad_probability = ours.softmax(-1)[..., run.tokenizer.pad_id]
    assert bool((pad_probability <= 1 / vocab).all())  # mean row: never likelier than uniform
    assert torch.allclose(run.model.wte.weight[-1], hf_model.transformer.wte.weight.mean(0), atol=1e-6)


def test_import_hf_reads_vocab_and_merges_without_tokenizer_json(tiny_tokenizer, tmp_path):
    _save_hf_gpt2(tmp_path / "hf", tiny_tokenizer.hf, tiny_tokenizer.vocab_size)
    tokenizer_json = json.loads((tmp_path / "hf" / "tokenizer.json").read_text())
    (tmp_path / "hf" / "vocab.json").write_text(json.dumps(tokenizer_json["model"]["vocab"]))
    merges = tokenizer_json["model"]["merges"]
    lines = [" ".join(m) if isinstance(m, list) else m for m in merges]
    (tmp_path / "hf" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(lines) + "\n")
    (tmp_path / "hf" / "tokenizer.json").unlink()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    run = load_run(tmp_path / "run")
    text = "Review 5: I loved every minute"
    assert run.tokenizer.encode(text) == tiny_tokenizer.encode(text)


def test_import_hf_rejects_an_unsupported_architecture(tmp_path, capsys):
    (tmp_path / "bert").mkdir()
    config = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 32000}
    (tmp_path / "bert" / "config.json").write_text(json.dumps(config))
    assert main(["import", str(tmp_path / "bert"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "BertForMaskedLM" in err and "LlamaForCausalLM" in err  # names what it found and what is supported
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("make", "message"), [(None, "is not a folder"), ("empty", "has no config.json")])
def test_import_hf_rejects_a_missing_or_empty_folder(tmp_path, capsys, make, message):
    if make:
        (tmp_path / "src").mkdir()
    assert main(["import", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 2
    assert message in capsys.readouterr().err


def test_import_hf_rejects_an_untied_or_other_activation_gpt2(tiny_tokenizer, tmp_path, capsys):
    _save_hf_gpt2(tmp_path / "hf", tiny_tokenizer.hf, tiny_tokenizer.vocab_size, activation_function="relu")
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    assert "activation_function='relu'" in capsys.readouterr().err


def test_import_hf_rejects_a_tokenizer_larger_than_the_vocabulary(tiny_tokenizer, tmp_path, capsys):
    rows = tiny_tokenizer.vocab_size - 100
    _save_hf_gpt2(tmp_path / "hf", tiny_tokenizer.hf, rows)
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{tiny_tokenizer.vocab_size} tokens but the weights only {rows}" in err


def test_import_hf_rejects_a_folder_without_weights(tiny_tokenizer, tmp_path, capsys):
    _save_hf_gpt2(tmp_path / "hf", tiny_tokenizer.hf, tiny_tokenizer.vocab_size)
    (tmp_path / "hf" / "model.safetensors").unlink()
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    assert "holds no weights" in capsys.readouterr().err
