"""`aigc import` of hostile or damaged models: a declared size that the tensors do not back, a key that
is missing or not a number, damaged weights and tokenizer files, shard names outside the folder. Each
is one line naming the file and the field, exit 2, and no traceback; nothing is sized by a declared
number before it is checked (a GGUF declaring 10^9 layers took 5.5 GB and 61 s before a MemoryError)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_gguf import write_tiny_llama  # the tiny-GGUF writer of the reader's tests

from aigc.cli import main

transformers = pytest.importorskip("transformers")

BILLION = 10**9


def one_line_error(argv: list[str], capsys) -> str:
    """Run the CLI; it must fail with exit 2 and exactly one error line, which is returned."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1, err[-2000:]
    return lines[0]


# -------------------------------------------------------------------------------------------------
# GGUF
# -------------------------------------------------------------------------------------------------

GGUF_CASES = {  # metadata override -> what the error says
    "block_count": (BILLION, "llama.block_count is 1000000000 but the file holds tensors of 2 (layers 0..1)"),
    "head_count": (0, "llama.attention.head_count is 0"),
    "head_count_kv": (BILLION, "llama.attention.head_count_kv x head size is 64000000000"),
    "embedding_length": (BILLION, "llama.embedding_length is 1000000000 but the embedding's width is 256"),
    "feed_forward_length": (BILLION, "llama.feed_forward_length is 1000000000 but layer 0's gate_proj"),
    "context_length": (0, "llama.context_length is 0"),
    "rope_dimension_count": (BILLION, "rotary on 1000000000 of 64 head dims"),
}


@pytest.mark.parametrize("key", sorted(GGUF_CASES))
def test_import_gguf_refuses_sizes_the_tensors_do_not_back(tmp_path, capsys, key):
    value, message = GGUF_CASES[key]
    path = tmp_path / "bomb.gguf"
    write_tiny_llama(path, keys={key: value})
    line = one_line_error(["import", str(path), "--out", str(tmp_path / "run")], capsys)
    assert message in line and str(path) in line


# -------------------------------------------------------------------------------------------------
# Hugging Face Llama folders
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory, reviews):
    """A tiny random LlamaForCausalLM folder (model.safetensors, config.json, tokenizer.json)."""
    from aigc.tokenizer import Tokenizer

    tokenizer = Tokenizer.train((text for text, _ in reviews), vocab_size=300, labels=())
    folder = tmp_path_factory.mktemp("hf") / "llama"
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tokenizer.hf.to_str(), encoding="utf-8")
    return folder


def _copy(folder, tmp_path):
    out = tmp_path / "src"
    shutil.copytree(folder, out)
    return out


def _edit_config(src, change):
    path = src / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _set(key, value):
    return lambda config: config.__setitem__(key, value)


CONFIG_CASES = {
    "layers": (_set("num_hidden_layers", BILLION), "num_hidden_layers is 1000000000 but the file holds tensors of 2"),
    "heads-0": (_set("num_attention_heads", 0), "num_attention_heads is 0"),
    "heads-many": (_set("num_attention_heads", 32), "config.json: head_dim 8 != hidden_size / num_attention_heads"),
    "kv-heads": (_set("num_key_value_heads", "two"), "num_key_value_heads is 'two', not a whole number"),
    "hidden-missing": (lambda c: c.pop("hidden_size"), "hidden_size is missing"),
    "intermediate": (_set("intermediate_size", BILLION), "intermediate_size is 1000000000 but layer 0's gate_proj"),
    "vocab": (_set("vocab_size", BILLION), "vocab_size is 1000000000 but the embedding's row count is"),
    "context": (_set("max_position_embeddings", -1), "max_position_embeddings is -1"),
    "eps": (_set("rms_norm_eps", "tiny"), "rms_norm_eps is 'tiny', not a positive number"),
    "architectures": (_set("architectures", "LlamaForCausalLM"), "architectures must be a list"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_import_hf_llama_refuses_a_bad_config(llama_folder, tmp_path, capsys, case):
    change, message = CONFIG_CASES[case]
    src = _copy(llama_folder, tmp_path)
    _edit_config(src, change)
    line = one_line_error(["import", str(src), "--out", str(tmp_path / "run")], capsys)
    assert message in line
    assert not (tmp_path / "run").exists()  # refused before the output folder is made


def _truncate(src):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])


def _pickle_garbage(src):
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"PK\x03\x04 not a zip archive at all" * 10)


def _index(shard):
    def make(src):
        (src / "model.safetensors").rename(src / "shard-1.safetensors")
        index = {"metadata": {}, "weight_map": {"model.norm.weight": "shard-1.safetensors", "x": shard}}
        (src / "model.safetensors.index.json").write_text(json.dumps(index))

    return make


FILE_CASES = {
    "config-array": (lambda s: (s / "config.json").write_text("[1, 2]"), "config.json holds a JSON list"),
    "config-binary": (lambda s: (s / "config.json").write_bytes(b"\xff\xfe{"), "config.json is not valid UTF-8 JSON"),
    "truncated": (_truncate, "model.safetensors is not a readable safetensors file"),
    "pickle-garbage": (_pickle_garbage, "pytorch_model.bin is not a readable PyTorch weights file"),
    "tokenizer-garbage": (lambda s: (s / "tokenizer.json").write_text("{nope"), "tokenizer.json is not a valid"),
    "tokenizer-binary": (lambda s: (s / "tokenizer.json").write_bytes(b"\xff\x00"), "tokenizer.json is not UTF-8"),
    "index-parent": (_index("../../etc/passwd"), "names the shard '../../etc/passwd', outside the model folder"),
    "index-absolute": (_index("/etc/passwd"), "names the shard '/etc/passwd', outside the model folder"),
    "index-no-map": (lambda s: _index("x")(s) or (s / _INDEX).write_text("[]"), "index.json holds a JSON list"),
}
_INDEX = "model.safetensors.index.json"


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_import_hf_llama_refuses_damaged_files(llama_folder, tmp_path, capsys, case):
    damage, message = FILE_CASES[case]
    src = _copy(llama_folder, tmp_path)
    damage(src)
    line = one_line_error(["import", str(src), "--out", str(tmp_path / "run")], capsys)
    assert message in line


def test_import_hf_llama_refuses_a_tokenizer_larger_than_the_embedding(llama_folder, tmp_path, capsys):
    src = _copy(llama_folder, tmp_path)
    path = src / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab.update({f"extra{i}": len(vocab) + i for i in range(500)})  # 500 more tokens than embedding rows
    path.write_text(json.dumps(tokenizer))
    line = one_line_error(["import", str(src), "--out", str(tmp_path / "run")], capsys)
    assert "tokens but the weights only" in line and "embedding rows" in line


def test_import_hf_llama_shard_index_inside_the_folder_still_works(llama_folder, tmp_path):
    src = _copy(llama_folder, tmp_path)
    (src / "model.safetensors").rename(src / "model-00001-of-00001.safetensors")
    names = json.loads(json.dumps(list(_shapes(src / "model-00001-of-00001.safetensors"))))
    weight_map = dict.fromkeys(names, "model-00001-of-00001.safetensors")
    (src / _INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert main(["import", str(src), "--out", str(tmp_path / "run")]) == 0


def _shapes(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


# -------------------------------------------------------------------------------------------------
# Hugging Face GPT-2 folders
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory, tiny_tokenizer_module):
    folder = tmp_path_factory.mktemp("hf") / "gpt2"
    vocab = tiny_tokenizer_module.vocab_size
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    (folder / "tokenizer.json").write_text(tiny_tokenizer_module.hf.to_str(), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_tokenizer_module(reviews):
    from aigc.tokenizer import Tokenizer

    return Tokenizer.train((text for text, _ in reviews), vocab_size=300, labels=("pos", "neg"))


GPT2_CASES = {
    "layers": (_set("n_layer", BILLION), "n_layer is 1000000000 but the file holds tensors of 2"),
    "heads-0": (_set("n_head", 0), "n_head is 0"),
    "heads-odd": (_set("n_head", 5), "n_embd (32) must be divisible by n_head (5)"),
    "positions": (_set("n_positions", BILLION), "n_positions is 1000000000 but the position embedding's row count"),
    "width": (_set("n_embd", "wide"), "n_embd is 'wide', not a whole number"),
    "width-missing": (lambda c: c.pop("n_embd"), "n_embd is missing"),
    "epsilon": (_set("layer_norm_epsilon", "small"), "layer_norm_epsilon='small'; aigc's GPT needs 1e-5"),
}


@pytest.mark.parametrize("case", sorted(GPT2_CASES))
def test_import_hf_gpt2_refuses_a_bad_config(gpt2_folder, tmp_path, capsys, case):
    change, message = GPT2_CASES[case]
    src = _copy(gpt2_folder, tmp_path)
    _edit_config(src, change)
    line = one_line_error(["import", str(src), "--out", str(tmp_path / "run")], capsys)
    assert message in line


def test_import_hf_gpt2_refuses_damaged_tokenizer_files(gpt2_folder, tmp_path, capsys):
    src = _copy(gpt2_folder, tmp_path)
    (src / "tokenizer.json").write_text('{"model": 3}')
    assert "tokenizer.json is not a valid tokenizer" in one_line_error(["import", str(src), "--out", "x"], capsys)
    (src / "tokenizer.json").unlink()
    (src / "vocab.json").write_text("[]")
    (src / "merges.txt").write_text("a b c d\n")
    line = one_line_error(["import", str(src), "--out", str(tmp_path / "run")], capsys)
    assert "vocab.json and merges.txt are not a BPE vocabulary" in line
