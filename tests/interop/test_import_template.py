"""`aigc import` checks the model's chat template before it stores it: a template that a chat request
could not render within the limits (time, size, recursion) is refused with one line, and nothing is kept."""

from __future__ import annotations

import json

import pytest
import test_gguf  # the tiny-GGUF writer of the reader's tests; its CHAT_TEMPLATE goes into the metadata
from test_gguf import write_tiny_llama

from aigc.artifacts.run import CHAT_TEMPLATE
from aigc.cli import main


@pytest.mark.parametrize(
    "template, fragment",
    [
        ("{{ 'x' * 10**9 }}", "the limit is"),
        ("{% for m in messages %}{{ m['content'] }}", "does not parse"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recurses too deeply"),
    ],
)
def test_import_refuses_a_gguf_whose_chat_template_fails(tmp_path, monkeypatch, capsys, template, fragment):
    monkeypatch.setattr(test_gguf, "CHAT_TEMPLATE", template)
    write_tiny_llama(tmp_path / "tiny.gguf")
    out = tmp_path / "run"
    assert main(["import", str(tmp_path / "tiny.gguf"), "--out", str(out), "--context", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"chat template of {(tmp_path / 'tiny.gguf').resolve()}" in err and fragment in err
    assert len(err.splitlines()) == 1
    assert not (out / CHAT_TEMPLATE).exists() and not (out / "config.json").exists()


def test_import_keeps_a_good_chat_template(tmp_path):
    write_tiny_llama(tmp_path / "tiny.gguf")
    assert main(["import", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "run"), "--context", "64"]) == 0
    assert (tmp_path / "run" / CHAT_TEMPLATE).read_text(encoding="utf-8") == test_gguf.CHAT_TEMPLATE


def test_import_refuses_an_hf_folder_whose_tokenizer_config_template_fails(tmp_path, tiny_tokenizer, capsys):
    transformers = pytest.importorskip("transformers")
    shape = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4)
    config = transformers.LlamaConfig(
        vocab_size=tiny_tokenizer.vocab_size, max_position_embeddings=64, architectures=["LlamaForCausalLM"], **shape
    )
    folder = tmp_path / "hf"
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tiny_tokenizer.save(folder / "tokenizer.json")
    hostile = "{% for i in range(10000) %}{{ 'x' * 10000 }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": hostile}), encoding="utf-8")
    out = tmp_path / "run"
    capsys.readouterr()  # transformers' progress bar
    assert main(["import", str(folder), "--out", str(out), "--context", "64"]) == 2
    err = capsys.readouterr().err.strip()
    assert f"chat template of {folder.resolve()}" in err and "bytes in all (the limit)" in err
    assert len(err.splitlines()) == 1
    assert not (out / "config.json").exists()
