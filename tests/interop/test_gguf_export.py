"""GGUF export, read back by readers that are not ours (transformers' GGUF loader, gguf's reader with
llama.cpp's names) and by `aigc import`; the Ollama Modelfile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader
from gguf.quants import dequantize, quantize

from aigc.artifacts.run import WEIGHTS, RunConfig, Weights, save_run, save_weights
from aigc.cli import main
from aigc.config import SampleConfig
from aigc.generate import Request, generate
from aigc.interop.gguf import unpermute_rows
from aigc.interop.gguf_export import HIGHER_PRECISION_OUTPUT, permute_rows
from aigc.interop.ollama import CHATML_GO, modelfile
from aigc.models import load_run
from aigc.models.lora import LoRASpec, apply_lora

transformers = pytest.importorskip("transformers")

LLAMA = dict(norm="rmsnorm", positions="rotary", mlp="swiglu", bias=False, n_head=4, n_kv_head=2, rope_theta=5e4)
ARCHS = {  # GGUF architecture -> model_preset("tiny") overrides
    "llama": LLAMA,
    "qwen2": {**LLAMA, "qkv_bias": True},
    "gpt2": {},
}
TEXT = "Review 7: a wonderful film, 这部电影非常好看 😀  with  spaces\nand a new line"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def export(run_dir, out, *options) -> list:
    assert main(["export", str(run_dir), "--format", "gguf", "--out", str(out), *options]) == 0
    return sorted(out.glob("*.gguf"))


def hf_from_gguf(path, block_size: int = 64):
    # transformers reads `gpt2.context_length` as n_ctx, which GPT2Config no longer uses for the position
    # table (n_positions, default 1024): the table's size is passed here. Other architectures ignore it.
    extra = {"n_positions": block_size} if GGUFReader(path).fields["general.architecture"].contents() == "gpt2" else {}
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, **extra
    ).eval()


def logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))
    return out.logits if hasattr(out, "logits") else out[0]


def round_tripped(model, qtype: Q) -> None:
    """Every matrix of `model` replaced, in place, by what `qtype` keeps of it (rows are blocks); the
    output matrix (the embedding, when tied) by what the export's higher precision keeps of it."""
    output = "wte.weight" if model.config.tie_embeddings else "lm_head.weight"
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2:
                kind = HIGHER_PRECISION_OUTPUT.get(qtype, qtype) if name == output else qtype
                kept = dequantize(quantize(param.numpy(), kind), kind).reshape(param.shape)
                param.copy_(torch.from_numpy(np.ascontiguousarray(kept)))


@pytest.fixture(params=list(ARCHS))
def arch_run(request, make_run):
    return request.param, make_run("gpt", name=request.param, seed=3, **ARCHS[request.param])


def test_gguf_f32_logits_match_transformers(arch_run, tmp_path):
    arch, run_dir = arch_run
    (path,) = export(run_dir, tmp_path / "out", "--quant", "f32")
    run = load_run(run_dir)
    reference = hf_from_gguf(path)
    assert type(reference).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}.get(
        arch, "GPT2LMHeadModel"
    )
    ids = run.tokenizer.encode(TEXT)
    assert (logits(run.model, ids) - logits(reference, ids)).abs().max().item() < 1e-4


@pytest.mark.parametrize("quant,qtype", [("q8_0", Q.Q8_0), ("q4_0", Q.Q4_0)])
def test_gguf_quantised_logits_are_the_quantised_model(make_run, tmp_path, quant, qtype):
    """transformers' logits equal (1e-4) those of our model with each matrix quantised and expanded
    again: the file holds exactly what the quantiser keeps, and nothing else is lost."""
    run_dir = make_run("gpt", seed=3, **LLAMA)
    (path,) = export(run_dir, tmp_path / "out", "--quant", quant)
    run = load_run(run_dir)
    ids = run.tokenizer.encode(TEXT)
    exact = logits(run.model, ids)
    round_tripped(run.model, qtype)
    theirs = logits(hf_from_gguf(path), ids)
    assert (logits(run.model, ids) - theirs).abs().max().item() < 1e-4
    assert 0 < (exact - theirs).abs().max().item() < {"q8_0": 0.05, "q4_0": 0.5}[quant]


def llama_cpp_names(n_layer: int, arch: str) -> set[str]:
    """The tensor names llama.cpp's converter writes for a model of ours (tied output for llama/qwen2)."""
    if arch == "gpt2":
        top = {"token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias", "output.weight"}
        parts = ["attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down"]
        kinds = ("weight", "bias")
        return top | {f"blk.{i}.{p}.{k}" for i in range(n_layer) for p in parts for k in kinds}
    top = {"token_embd.weight", "output_norm.weight"}
    parts = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    names = top | {f"blk.{i}.{p}.weight" for i in range(n_layer) for p in parts}
    if arch == "qwen2":
        names |= {f"blk.{i}.{p}.bias" for i in range(n_layer) for p in ("attn_q", "attn_k", "attn_v")}
    return names


def test_gguf_reader_sees_llama_cpp_names_shapes_and_types(arch_run, tmp_path):
    arch, run_dir = arch_run
    (path,) = export(run_dir, tmp_path / "out", "--quant", "q8_0")
    config = load_run(run_dir).config.model
    reader = GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == llama_cpp_names(config.n_layer, arch)
    for name, tensor in tensors.items():
        assert tensor.tensor_type == (Q.F32 if len(tensor.shape) == 1 else Q.Q8_0), name
    # GGUF lists dimensions innermost first: (in, out)
    head_dim = config.n_embd // config.n_head
    qkv = (config.n_head + 2 * config.kv_heads) * head_dim
    expected = {"token_embd.weight": [config.n_embd, config.vocab_size]}
    expected |= {"blk.0.attn_qkv.weight": [config.n_embd, qkv]} if arch == "gpt2" else {}
    expected |= {} if arch == "gpt2" else {"blk.1.attn_k.weight": [config.n_embd, config.kv_heads * head_dim]}
    expected |= {} if arch == "gpt2" else {"blk.0.ffn_gate.weight": [config.n_embd, config.ffn_size]}
    for name, shape in expected.items():
        assert [int(d) for d in tensors[name].shape] == shape, name
    fields = reader.fields
    assert fields["general.architecture"].contents() == arch
    assert fields[f"{arch}.block_count"].contents() == config.n_layer
    assert fields[f"{arch}.context_length"].contents() == config.block_size
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"].contents()) == config.vocab_size
    if arch != "gpt2":
        assert fields[f"{arch}.attention.head_count_kv"].contents() == config.kv_heads
        assert fields[f"{arch}.rope.freq_base"].contents() == pytest.approx(5e4)


def test_gguf_llama_rows_are_in_llama_cpp_order(make_run, tmp_path):
    """llama files hold Q and K rows interleaved per head (llama.cpp's converter's order); the F32
    file holds exactly our rows permuted so, and the importer's inverse gives them back."""
    run_dir = make_run("gpt", seed=3, **LLAMA)
    (path,) = export(run_dir, tmp_path / "out", "--quant", "f32")
    c_attn = load_run(run_dir).model.h[0].attn.c_attn.weight.detach()  # (q + k + v, C)
    q, k, _ = c_attn.split([64, 32, 32])
    stored = {t.name: torch.from_numpy(np.array(t.data)) for t in GGUFReader(path).tensors}
    assert torch.equal(stored["blk.0.attn_q.weight"], permute_rows(q, 4))
    assert torch.equal(stored["blk.0.attn_k.weight"], permute_rows(k, 2))
    assert not torch.equal(stored["blk.0.attn_q.weight"], q)
    assert torch.equal(unpermute_rows(permute_rows(q, 4), 4), q)


def lively(run_dir):
    """Give a fresh run's matrices a larger spread, so that greedy decoding writes varied text instead
    of repeating the one token a near-uniform model prefers."""
    run = load_run(run_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in run.model.parameters():
            if param.ndim == 2:
                param.normal_(0, 0.3)
    save_weights(run.model, run_dir / WEIGHTS)
    return run_dir


def greedy(run_dir, prompt: str = "Review 1: a") -> tuple[int, ...]:
    run = load_run(run_dir)
    config = SampleConfig(temperature=0.0, max_new_tokens=20)
    return generate(run.model, run.tokenizer, [Request(prompt=prompt, config=config)])[0].token_ids


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("quant", ["f32", "f16"])
def test_aigc_import_of_the_export_generates_the_same_text(make_chat_run, tmp_path, arch, quant):
    run_dir = lively(make_chat_run(seed=3, **ARCHS[arch]))
    (path,) = export(run_dir, tmp_path / "out", "--quant", quant)
    assert main(["import", str(path), "--out", str(tmp_path / "back"), "--context", "64"]) == 0
    expected = greedy(run_dir)
    assert len(set(expected)) > 3  # a text, not one token repeated
    assert greedy(tmp_path / "back") == expected
    assert (tmp_path / "back" / "chat_template.jinja").read_text() == (run_dir / "chat_template.jinja").read_text()
    if quant == "f32":  # same tokenizer, token for token, special tokens included
        ours, back = load_run(run_dir).tokenizer, load_run(tmp_path / "back").tokenizer
        assert back.encode(TEXT + "<|pos|><|endoftext|>") == ours.encode(TEXT + "<|pos|><|endoftext|>")


def test_gguf_of_a_lora_run_is_the_merged_model(make_run, tiny_tokenizer, tmp_path):
    base = load_run(make_run("gpt", name="base", seed=3, **LLAMA))
    ids = tiny_tokenizer.encode(TEXT)
    plain = logits(base.model, ids)
    spec = LoRASpec(rank=2, alpha=4.0, targets=("c_attn", "c_proj", "c_fc"))
    apply_lora(base.model, spec)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in base.model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)
    config = RunConfig(model=base.config.model, data=base.config.data, weights=Weights("lora", lora=spec.to_json()))
    run_dir = save_run(tmp_path / "lora", config, tiny_tokenizer, base.model)
    (path,) = export(run_dir, tmp_path / "out", "--quant", "f32")
    adapted = logits(load_run(run_dir).model, ids)
    assert (adapted - plain).abs().max() > 1e-3  # the adapters change the model
    assert (adapted - logits(hf_from_gguf(path), ids)).abs().max().item() < 1e-4


def test_gguf_metadata_for_a_chat_run(make_chat_run, tmp_path):
    """eos is the token that ends the assistant's turn; a chat run does not get <|endoftext|> prepended."""
    run_dir = make_chat_run(seed=3, **LLAMA)
    (run_dir / "chat_template.jinja").write_text(CHATML.replace("<|im_end|>", "<|endoftext|>"))
    (path,) = export(run_dir, tmp_path / "out")
    fields = GGUFReader(path).fields
    tokenizer = load_run(run_dir).tokenizer
    assert fields["tokenizer.ggml.eos_token_id"].contents() == tokenizer.eot_id
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    assert fields["tokenizer.ggml.padding_token_id"].contents() == tokenizer.pad_id
    assert "<|im_start|>" in fields["tokenizer.chat_template"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[tokenizer.eot_id] == 3 and types[tokenizer.label_id("pos")] == 3 and types[300] == 1
    assert {t.tensor_type for t in GGUFReader(path).tensors} == {Q.F16, Q.F32}  # the default --quant f16


def test_gguf_export_refuses_what_gguf_cannot_hold(make_run, tmp_path, capsys):
    assert main(["export", str(make_run("lstm")), "--format", "gguf", "--out", str(tmp_path / "a")]) == 2
    assert "LSTM" in capsys.readouterr().err
    biased = make_run("gpt", name="biased", **{**LLAMA, "bias": True})
    assert main(["export", str(biased), "--format", "gguf", "--out", str(tmp_path / "b")]) == 2
    assert "--bias" in capsys.readouterr().err
    assert main(["export", str(biased), "--format", "hf", "--quant", "q8_0", "--out", str(tmp_path / "c")]) == 2
    assert "--quant applies to --format gguf or ollama" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "abc")


def test_ollama_modelfile(make_chat_run, tmp_path):
    run_dir = make_chat_run(seed=3, **LLAMA)
    out = tmp_path / "ollama"
    args = ["export", str(run_dir), "--format", "ollama", "--quant", "q8_0", "--out", str(out)]
    assert main([*args, "--system", 'Be "brief".\nAlways.']) == 0
    lines = (out / "Modelfile").read_text().splitlines()
    assert lines[0] == "FROM ./model-q8_0.gguf" and (out / "model-q8_0.gguf").is_file()
    assert 'PARAMETER stop "<|endoftext|>"' in lines  # the tiny template ends turns with eos_token
    assert 'SYSTEM """Be "brief".' in lines and 'Always."""' in lines
    assert not any(line.startswith("TEMPLATE") for line in lines)  # not ChatML: left to Ollama


def test_ollama_modelfile_of_a_chatml_run(make_run):
    run_dir = make_run("gpt", seed=3, **LLAMA)
    (run_dir / "chat_template.jinja").write_text(CHATML)
    text = modelfile(load_run(run_dir), "m.gguf")
    assert f'TEMPLATE """{CHATML_GO}"""' in text
    assert 'PARAMETER stop "<|endoftext|>"' in text


@pytest.mark.parametrize("quant", ["bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_every_quant_type_reads_back_as_the_quantised_model(make_run, tmp_path, quant, monkeypatch):
    """Each --quant, read back by `aigc import`, is the run with its matrices quantised and expanded. The
    text is longer than the kernels' rows, so its layers multiply expanded tiles: float32 here, to compare
    at 1e-4 (AMX hosts choose bf16 tiles, tested in tests/models/test_quant.py)."""
    monkeypatch.setenv("AIGC_QUANT_TILES", "float32")
    run_dir = make_run("gpt", seed=3, **ARCHS["qwen2"])
    (path,) = export(run_dir, tmp_path / "out", "--quant", quant)
    assert {t.tensor_type.name for t in GGUFReader(path).tensors if len(t.shape) == 2} == (
        {quant.upper()} if quant in ("bf16", "q8_0") else {quant.upper(), "Q8_0"}  # the output matrix at Q8_0
    )
    assert main(["import", str(path), "--out", str(tmp_path / "back"), "--context", "64"]) == 0
    run = load_run(run_dir)
    ids = run.tokenizer.encode(TEXT)
    round_tripped(run.model, Q[quant.upper()])
    assert (logits(run.model, ids) - logits(load_run(tmp_path / "back").model, ids)).abs().max().item() < 1e-4


def test_gguf_of_an_untied_llama_writes_its_output_matrix(make_run, tmp_path):
    run_dir = make_run("gpt", seed=3, **LLAMA, tie_embeddings=False)
    (path,) = export(run_dir, tmp_path / "out", "--quant", "q4_0")
    types = {t.name: t.tensor_type for t in GGUFReader(path).tensors}
    assert types["output.weight"] == Q.Q8_0 and types["token_embd.weight"] == Q.Q4_0
    run = load_run(run_dir)
    ids = run.tokenizer.encode(TEXT)
    round_tripped(run.model, Q.Q4_0)
    assert (logits(run.model, ids) - logits(hf_from_gguf(path), ids)).abs().max().item() < 1e-4
