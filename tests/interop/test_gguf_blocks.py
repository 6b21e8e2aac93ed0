"""`aigc import FILE.gguf` keeps quantised blocks: the run computes the logits of the fp32 import
(`--dequantize`), with the native kernels and with the PyTorch fallback, maps its weights instead
of copying them, stays the size of the file, and refuses damaged weights in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from test_gguf import LAYER_TYPES, write_tiny_llama  # the tiny-GGUF writer of the reader's tests

from aigc.artifacts.run import WEIGHTS, read_run_config
from aigc.cli import main
from aigc.errors import AigcError
from aigc.models import kinds, load_run, quant
from aigc.models.qblocks import dequantize
from aigc.models.qlinear import LAYOUT_KEY, QuantEmbedding, QuantLinear, read_mapped

# Every type the kernels take, q/k/v and gate/up of mixed types; layer 1 adds float and Q2_K/Q3_K
# tensors, which become float32 parts.
ALL_KEPT = [
    {
        "attn_q": Q.Q4_K,
        "attn_k": Q.Q4_K,
        "attn_v": Q.Q6_K,
        "attn_output": Q.Q5_K,
        "ffn_gate": Q.Q4_0,
        "ffn_up": Q.Q4_1,
        "ffn_down": Q.Q5_0,
    },
    {**LAYER_TYPES[1], "attn_output": Q.Q5_1, "ffn_up": Q.Q8_0},
]
PROMPT = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])


@pytest.fixture(scope="module", params=["llama-tied", "llama-untied", "qwen2"])
def imported(request, tmp_path_factory):
    """(quantised run, fp32 run, gguf path) of one tiny file."""
    options = {"llama-tied": {}, "llama-untied": {"tied": False}, "qwen2": {"arch": "qwen2", "pre": "qwen2"}}
    folder = tmp_path_factory.mktemp(request.param)
    path = folder / "tiny.gguf"
    write_tiny_llama(path, types=ALL_KEPT, **options[request.param])
    assert main(["import", str(path), "--out", str(folder / "quant"), "--context", "64"]) == 0
    assert main(["import", str(path), "--out", str(folder / "fp32"), "--context", "64", "--dequantize"]) == 0
    return folder / "quant", folder / "fp32", path


def logits(run_dir: Path, idx: torch.Tensor = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return load_run(run_dir).model(idx)[0]


def test_the_run_keeps_every_supported_type_as_blocks(imported):
    quant_dir, _, _ = imported
    config = read_run_config(quant_dir)
    assert config.weights.format == "quantized"
    kept = set(config.weights.quantization["weights_by_type"])
    assert {"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"} <= kept
    tensors, meta = read_mapped(quant_dir / WEIGHTS)
    layout = json.loads(meta[LAYOUT_KEY])
    assert [p[0] for p in layout["h.0.attn.c_attn"]] == ["Q4_K", "Q6_K"]  # q and k stacked, v apart
    assert tensors["h.0.attn.c_attn.weight.0"].dtype == torch.uint8
    model = load_run(quant_dir).model
    assert isinstance(model.wte, QuantEmbedding) and isinstance(model.lm_head, QuantLinear)


@pytest.fixture(scope="module")
def kept_only(tmp_path_factory):
    """A run of a file whose layers are all of kept types (float tensors would grow to fp32)."""
    folder = tmp_path_factory.mktemp("kept")
    write_tiny_llama(folder / "tiny.gguf", types=[ALL_KEPT[0]] * 2)
    assert main(["import", str(folder / "tiny.gguf"), "--out", str(folder / "run"), "--context", "64"]) == 0
    return folder / "run", folder / "tiny.gguf"


def test_the_weights_file_is_the_size_of_the_gguf(kept_only):
    run_dir, path = kept_only
    assert (run_dir / WEIGHTS).stat().st_size <= 1.1 * path.stat().st_size


def test_quantised_and_dequantised_imports_give_the_same_logits(imported, float_products):
    quant_dir, fp32_dir, _ = imported
    expected = logits(fp32_dir)
    torch.testing.assert_close(logits(quant_dir), expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # decoding one and two rows goes through the product kernels
        model = load_run(quant_dir).model
        for rows in (1, 2):
            cache = model.new_cache(rows)
            model(PROMPT[:, :-1].expand(rows, -1), cache=cache)
            step = model(PROMPT[:, -1:].expand(rows, -1), cache=cache)[0]
            torch.testing.assert_close(step[:, 0], expected[:, -1].expand(rows, -1), rtol=1e-4, atol=1e-4)


def test_the_fallback_gives_the_same_logits_as_the_kernels(imported, monkeypatch, float_products):
    quant_dir, _, _ = imported
    with_kernels = logits(quant_dir)
    monkeypatch.setenv("AIGC_NATIVE_KERNELS", "0")
    quant._kernels_for.cache_clear()
    try:
        assert quant.kernels() is None
        torch.testing.assert_close(logits(quant_dir), with_kernels, rtol=1e-4, atol=1e-4)
    finally:
        quant._kernels_for.cache_clear()


def test_integer_products_give_the_logits_of_their_reference_math(imported, monkeypatch):
    """With int8 activations each kernel product equals `rounded(x) @ W^T`; the model through the kernels
    then gives the logits of the model through that PyTorch reference. Against the fp32 run the rounding
    (about 0.5 % per product here) grows through these random tiny models to 2-14 % of the logits' norm,
    so the fp32 comparison is the greedy test below, not a tolerance."""
    quant_dir, _, _ = imported
    kernels = quant.kernels()
    if kernels is None or not kernels.integer:
        pytest.skip("no integer kernels on this machine")
    with torch.no_grad():
        model = load_run(quant_dir).model
        ours = model(PROMPT)[0]
        monkeypatch.setattr(kernels, "gemv", reference_gemv)
        torch.testing.assert_close(model(PROMPT)[0], ours, rtol=1e-3, atol=1e-3)


def reference_gemv(blocks, type_name, x, out, column):
    weight = dequantize(blocks, type_name, x.shape[1]).double()
    out[:, column : column + blocks.shape[0]] = (quant.rounded(x).double() @ weight.T).float()


def test_generate_is_greedy_alike(imported, capsys):
    quant_dir, fp32_dir, _ = imported
    texts = []
    for run in (quant_dir, fp32_dir):
        assert main(["generate", str(run), "--prompt", "the cat", "--max-new-tokens", "8", "--temperature", "0"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1]


def test_a_quantised_decode_step_runs_the_products_on_pytorchs_threads(imported):
    """The decode back-end of a quantised run steps with PyTorch on one thread and the products on the
    threads PyTorch had (`quant.cores_to_pool`); the prefill and a float run keep PyTorch's threads.
    The step's logits are those of the same step without the policy."""
    quant_dir, fp32_dir, _ = imported
    assert not kinds.decode_backend(load_run(fp32_dir).model, 0, torch.device("cpu")).pool_steps
    model = load_run(quant_dir).model
    seen = []
    model.register_forward_hook(lambda *_: seen.append((torch.get_num_threads(), quant._threads(1 << 30))))
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            backend = kinds.decode_backend(model, 0, torch.device("cpu"))
            backend.prefill([PROMPT[0, :-1].tolist()] * 2)
            stepped = backend.step(PROMPT[:, -1:].expand(2, -1), rows=[])
            cache = model.new_cache(2)
            model(PROMPT[:, :-1].expand(2, -1), cache=cache)
            plain = model(PROMPT[:, -1:].expand(2, -1), cache=cache)[0][:, -1]
    finally:
        torch.set_num_threads(before)
    assert seen[:2] == [(2, 2), (1, 2)]
    torch.testing.assert_close(stepped, plain)


def test_the_weights_are_mapped_not_copied(kept_only):
    run_dir, _ = kept_only
    model = load_run(run_dir).model
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str((run_dir / WEIGHTS).resolve()) in maps.read_text()
    floats = sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.dtype == torch.float32)
    assert floats < model.config.n_embd * (2 * model.config.n_layer + 4)  # norms, biases, the <|pad|> row


def damage(run_dir: Path, how: str) -> None:
    path = run_dir / WEIGHTS
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
        return
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    layout = json.loads(header["__metadata__"][LAYOUT_KEY])
    if how == "rows":
        layout["h.0.mlp.c_proj"][0][1] += 1  # one more row than the blocks hold
    elif how == "width":
        layout["h.0.mlp.c_proj"][0][2] -= 1  # not a multiple of the block
    elif how == "type":
        layout["h.0.mlp.c_proj"][0][0] = "Q8_0"  # Q5_0's bytes read as Q8_0
    header["__metadata__"][LAYOUT_KEY] = json.dumps(layout)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])


@pytest.mark.parametrize("how", ["truncated", "rows", "width", "type"])
def test_damaged_quantised_weights_are_refused_in_one_line(tmp_path, how, capsys):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, types=ALL_KEPT)
    assert main(["import", str(path), "--out", str(tmp_path / "run"), "--context", "64"]) == 0
    capsys.readouterr()
    damage(tmp_path / "run", how)
    with pytest.raises(AigcError):
        load_run(tmp_path / "run")
    assert main(["generate", str(tmp_path / "run"), "--prompt", "hi", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err


def test_a_gguf_block_tensor_of_the_wrong_width_is_refused_in_one_line(tmp_path, capsys):
    """The inner dimension of a Q4_0 tensor rewritten from 256 to 248 (not a multiple of 32) in the
    file's tensor table: refused (here by gguf's reader) before anything is written."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, types=ALL_KEPT)
    raw = bytearray(path.read_bytes())
    name = b"blk.0.ffn_gate.weight"
    at = raw.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    assert int.from_bytes(raw[at : at + 4], "little") == 2  # two dimensions, the inner one first
    assert int.from_bytes(raw[at + 4 : at + 12], "little") == 256
    raw[at + 4 : at + 12] = (248).to_bytes(8, "little")
    path.write_bytes(bytes(raw))
    assert main(["import", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "multiple of Q4_0 block size" in err, err
    assert not (tmp_path / "run" / WEIGHTS).exists()
