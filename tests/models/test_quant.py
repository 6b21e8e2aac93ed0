"""Block-quantised weights: the PyTorch dequantiser against gguf's reference, and the native kernels
(native and forced-AVX2 builds, one and two threads, odd shapes) against that dequantiser."""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as reference
from gguf.quants import quantize

from aigc.errors import AigcError
from aigc.models import quant
from aigc.models.qblocks import QUANTISED, TYPES, check_blocks, dequantize
from aigc.models.qlinear import Part, QuantEmbedding, QuantLinear

COMPILER = os.environ.get("CC") or "cc"
ISAS = ["native", "avx2"] if " avx2" in quant.cpu_identity() else ["native"]
# gguf's Python quantiser covers these; for the K-quants it only dequantises.
GGUF_QUANTISES = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def blocks_of(type_name: str, rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """Blocks of real weights where gguf can quantise them, else valid random blocks."""
    generator = torch.Generator().manual_seed(seed)
    if type_name in GGUF_QUANTISES:
        weights = torch.randn(rows, cols, generator=generator).numpy()
        return torch.from_numpy(quantize(weights, GGMLQuantizationType[type_name]))
    return quant.random_blocks(type_name, rows, cols, generator)


@pytest.fixture(params=ISAS)
def kernels(request, monkeypatch, tmp_path_factory):
    if shutil.which(COMPILER) is None:
        pytest.skip(f"no C compiler {COMPILER!r}")
    monkeypatch.setenv("AIGC_QUANT_ISA", request.param)
    found = quant.kernels()
    assert found is not None, quant.unavailable_reason()
    assert found.isa == request.param
    if request.param == "avx2":  # the forced build multiplies with AVX2's maddubs, never VNNI
        assert found.dot == "avx2"
    elif " avx512_vnni" in quant.cpu_identity():
        assert found.dot == "avx512-vnni"
    return found


@pytest.mark.parametrize("type_name", QUANTISED)
def test_the_torch_dequantiser_equals_ggufs(type_name):
    cols = 2 * TYPES[type_name].block
    data = blocks_of(type_name, 3, cols)
    expected = reference(data.numpy(), GGMLQuantizationType[type_name])
    assert np.array_equal(dequantize(data, type_name, cols).numpy(), expected)


@pytest.mark.parametrize("type_name", QUANTISED)
def test_the_native_dequantiser_equals_the_torch_one(kernels, type_name):
    cols = 3 * TYPES[type_name].block
    data = blocks_of(type_name, 37, cols, seed=1)
    assert torch.equal(kernels.dequantize(data, type_name, cols), dequantize(data, type_name, cols))


@pytest.mark.parametrize("type_name", QUANTISED)
def test_the_native_bf16_expansion_rounds_as_torch_does(kernels, type_name):
    """Straight into bf16 (LoRA training on a quantised base), into rows of a wider tensor: the values
    of `.to(torch.bfloat16)` of the float32 expansion, and nothing outside the rows written."""
    cols = 3 * TYPES[type_name].block
    data = blocks_of(type_name, 37, cols, seed=2)
    out = torch.zeros(40, cols + 5, dtype=torch.bfloat16)
    kernels.dequantize_bf16_into(data, type_name, out[2:39, 3 : 3 + cols])
    for wrong in (torch.empty(37, cols), out[2:38, 3 : 3 + cols], out[2:39, 3 : 3 + cols].t()):  # dtype, rows, stride
        with pytest.raises(ValueError, match="quantised kernel: wrong"):
            kernels.dequantize_bf16_into(data, type_name, wrong)
    assert torch.equal(out[2:39, 3 : 3 + cols], dequantize(data, type_name, cols).to(torch.bfloat16))
    assert out[:2].abs().sum() == out[39:].abs().sum() == out[:, :3].abs().sum() == out[:, 3 + cols :].abs().sum() == 0


@pytest.mark.parametrize("type_name", QUANTISED)
@pytest.mark.parametrize("rows", [1, 2, 3, 15, 40])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("integer", [True, False], ids=["int8-activations", "float-activations"])
def test_kernels_equal_their_reference_on_odd_shapes(kernels, monkeypatch, type_name, rows, threads, integer):
    """37 outputs over 3 blocks; up to 32 rows take the kernel (15 = groups of 8, 4, 2, 1), 40 the tiled
    path (tiles of 8 weight rows here, float32 GEMM; the bf16 tiles of AMX hosts are tested below). The
    integer products see x rounded to 8 bits, `quant.rounded(x)`, and otherwise equal "dequantise, then
    F.linear"."""
    if integer and not kernels.dot:
        pytest.skip("this build has no integer products")
    monkeypatch.setenv("AIGC_QUANT_TILES", "float32")
    monkeypatch.setattr(kernels, "integer", integer)
    monkeypatch.setattr(quant, "THREADED_WEIGHTS", 0)
    monkeypatch.setattr(quant, "TILE_FLOATS", 8 * 3 * TYPES[type_name].block)
    cols = 3 * TYPES[type_name].block
    data = blocks_of(type_name, 37, cols, seed=rows)
    layer = QuantLinear([Part(type_name, data, 37, cols)], torch.randn(37))
    x = torch.randn(rows, cols)
    seen = quant.rounded(x) if integer and rows <= quant.PRODUCT_ROWS else x
    weight = dequantize(data, type_name, cols)
    expected = F.linear(seen.double(), weight.double(), layer.bias.double()).float()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            ours = layer(x)
    finally:
        torch.set_num_threads(2)
    # float32 sums in another order: error bounded by a few ulps of the sum of |terms|
    bound = 1e-5 * (seen.abs() @ weight.abs().T).max().item()
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=bound)


def test_activations_are_rounded_as_the_reference_rounds_them(kernels):
    """Blocks of 32: random, all zero, one large value among small ones, exact halves (ties to even)."""
    if not kernels.dot:
        pytest.skip("this build has no integer products")
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(0))
    x[0, 32:64] = 0
    x[1, 64:96] *= 1e-3
    x[1, 64] = 50.0
    x[2, :32] = torch.arange(32) - 15.5  # d = 16.5 / 127: some x / d land on .5
    q, d, s = kernels.round_rows(x)
    expected_q, expected_d = quant.round_activations(x)
    assert torch.equal(q, expected_q) and torch.equal(d, expected_d)
    torch.testing.assert_close(s, d * q.view(3, 4, 32).sum(-1).float(), rtol=1e-6, atol=0)
    assert (q[0, 32:64] == 0).all() and d[0, 1] == 0


@pytest.mark.parametrize("type_name", QUANTISED)
def test_integer_products_stay_within_the_activation_rounding_of_the_fallback(kernels, type_name):
    """Each activation is rounded to within d / 2 of itself (d = its block's max |x| / 127), so output o
    moves by at most sum_b d_b / 2 * sum_(j in b) |W[o, j]| from "dequantise, then F.linear"."""
    if not kernels.dot:
        pytest.skip("this build has no integer products")
    cols = 2 * TYPES[type_name].block
    data = blocks_of(type_name, 19, cols, seed=3)
    weight = dequantize(data, type_name, cols)
    x = torch.randn(5, cols) * torch.linspace(0.01, 10, cols)  # blocks of very different scales
    out = torch.empty(5, 19)
    kernels.gemv(data, type_name, x, out, 0)
    _, d = quant.round_activations(x)
    half_steps = (d / 2).repeat_interleave(32, dim=1)  # (5, cols): the largest rounding of each x
    bound = half_steps @ weight.abs().T + 1e-5 * (x.abs() @ weight.abs().T)
    error = (out - x @ weight.T).abs()
    assert (error <= bound).all()
    assert error.max() > 1e-3 * bound.max()  # the rounding did happen: this is not the float path


def test_a_layer_of_mixed_parts_writes_each_part_into_its_own_columns(kernels, monkeypatch):
    """q/k/v of different types, and an F32 part, fused into one layer (as GGUF's _M mixes need); 33 rows
    take float32 tiles here (bf16 tiles: `test_bf16_tiles_multiply_the_bf16_rounded_operands`)."""
    monkeypatch.setenv("AIGC_QUANT_TILES", "float32")
    cols = 256
    parts = [Part(t, blocks_of(t, r, cols, seed=r), r, cols) for t, r in (("Q4_K", 7), ("Q6_K", 5), ("Q8_0", 3))]
    parts.append(Part("F32", torch.randn(2, cols), 2, cols))
    layer = QuantLinear(parts, None)
    weight = torch.cat([dequantize(p.data, p.type, cols) for p in parts])
    for rows in (1, 2, 4, 9, 33):
        x = torch.randn(rows, cols)
        # the kernels round x for the block parts (up to PRODUCT_ROWS rows); the F32 part sees x itself
        seen = quant.rounded(x) if kernels.integer and rows <= quant.PRODUCT_ROWS else x
        expected = torch.cat((seen @ weight[:-2].T, x @ weight[-2:].T), dim=1)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    with torch.enable_grad():  # autograd: the PyTorch fallback
        torch.testing.assert_close(layer(x), x @ weight.T, rtol=1e-4, atol=1e-4)


def test_the_embedding_expands_only_the_rows_it_looks_up():
    cols = 64
    parts = [Part("Q8_0", blocks_of("Q8_0", 10, cols), 10, cols), Part("F32", torch.randn(1, cols), 1, cols)]
    table = torch.cat([dequantize(p.data, p.type, cols) for p in parts])
    embedding = QuantEmbedding(parts)
    idx = torch.tensor([[0, 10, 3], [9, 9, 10]])
    assert torch.equal(embedding(idx), table[idx])
    with pytest.raises(IndexError):
        embedding(torch.tensor([[11]]))


def test_without_native_kernels_the_fallback_computes(monkeypatch):
    monkeypatch.setenv("AIGC_NATIVE_KERNELS", "0")
    quant._kernels_for.cache_clear()
    try:
        assert quant.kernels() is None and "AIGC_NATIVE_KERNELS=0" in quant.unavailable_reason()
        data = blocks_of("Q4_0", 4, 64)
        x = torch.randn(1, 64)
        with torch.no_grad():
            out = QuantLinear([Part("Q4_0", data, 4, 64)], None)(x)
        torch.testing.assert_close(out, x @ dequantize(data, "Q4_0", 64).T)
    finally:
        quant._kernels_for.cache_clear()


def test_float_activations_can_be_chosen_by_the_environment(monkeypatch):
    """AIGC_QUANT_ACTIVATIONS=float keeps the float32 products: a decode row then equals the fallback's."""
    if shutil.which(COMPILER) is None:
        pytest.skip(f"no C compiler {COMPILER!r}")
    monkeypatch.setenv("AIGC_QUANT_ACTIVATIONS", "float")
    quant._kernels_for.cache_clear()
    try:
        found = quant.kernels()
        assert found is not None and not found.integer
        data = blocks_of("Q4_1", 9, 64)
        x = torch.randn(1, 64)
        with torch.no_grad():
            out = QuantLinear([Part("Q4_1", data, 9, 64)], None)(x)
        torch.testing.assert_close(out, x @ dequantize(data, "Q4_1", 64).T, rtol=1e-5, atol=1e-5)
    finally:
        quant._kernels_for.cache_clear()


@pytest.mark.parametrize(
    "data, type_name, rows, cols, message",
    [
        (torch.zeros(4, 18, dtype=torch.uint8), "Q4_0", 4, 48, "multiple of 32"),
        (torch.zeros(4, 17, dtype=torch.uint8), "Q4_0", 4, 32, r"needs torch.uint8 \(4, 18\)"),
        (torch.zeros(3, 18, dtype=torch.uint8), "Q4_0", 4, 32, r"holds uint8 \(3, 18\)"),
        (torch.zeros(4, 144, dtype=torch.uint8), "Q4_K", 4, 256, None),
        (torch.zeros(4, 144, dtype=torch.int8), "Q4_K", 4, 256, "holds int8"),
        (torch.zeros(4, 32), "Q4_0", 4, 32, "holds float32"),
        (torch.zeros(4, 34, dtype=torch.uint8), "Q3_K", 4, 256, "Q3_K' is not supported"),
    ],
)
def test_blocks_of_the_wrong_size_or_type_are_refused_in_one_line(data, type_name, rows, cols, message):
    if message is None:
        check_blocks(data, type_name, rows, cols, "layer")
        return
    with pytest.raises(AigcError, match=message) as error:
        check_blocks(data, type_name, rows, cols, "layer")
    assert "\n" not in str(error.value)


def test_the_kernel_wrappers_refuse_what_would_overrun(kernels):
    data = blocks_of("Q8_0", 4, 64)
    with pytest.raises(ValueError, match="shapes"):
        kernels.gemv(data, "Q8_0", torch.randn(1, 32), torch.empty(1, 4), 0)  # x narrower than the weights
    with pytest.raises(ValueError, match="shapes"):
        kernels.gemv(data, "Q8_0", torch.randn(3, 64), torch.empty(2, 4), 0)  # more rows than the output
    with pytest.raises(ValueError, match="shapes"):
        kernels.gemv(data, "Q8_0", torch.randn(1, 64), torch.empty(1, 4), 1)  # columns past the output
    with pytest.raises(ValueError, match="shapes"):
        kernels.dequantize(data[:, :30], "Q8_0", 64)


def test_products_from_two_python_threads_at_once_are_right(kernels, monkeypatch):
    """The worker pool runs one job at a time; a caller that finds it busy computes inline (ctypes
    releases the GIL, so the serve layer's threads can call at once)."""
    monkeypatch.setattr(quant, "THREADED_WEIGHTS", 0)
    data = blocks_of("Q4_1", 301, 256, seed=5)
    x = torch.randn(3, 256)
    expected = torch.empty(3, 301)
    kernels.gemv(data, "Q4_1", x, expected, 0)
    wrong = []

    def products() -> None:
        for _ in range(200):
            out = torch.empty(3, 301)
            kernels.gemv(data, "Q4_1", x, out, 0)
            wrong.append(not torch.equal(out, expected))

    callers = [threading.Thread(target=products) for _ in range(3)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(wrong) == 600 and not any(wrong)


def test_a_few_row_step_hands_pytorchs_threads_to_the_products(monkeypatch):
    """Inside `cores_to_pool` PyTorch runs on one thread and the products on all of PyTorch's; a larger
    step (PyTorch's GEMM multiplies it) and one thread are left alone; the count comes back after an error."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with quant.cores_to_pool(quant.PRODUCT_ROWS):
            assert (torch.get_num_threads(), quant._threads(quant.THREADED_WEIGHTS)) == (1, 2)
            assert quant._threads(quant.THREADED_WEIGHTS - 1) == 1  # small products stay on one thread
            with quant.cores_to_pool(1):  # nested: unchanged, and the outer one still restores
                assert (torch.get_num_threads(), quant._threads(quant.THREADED_WEIGHTS)) == (1, 2)
            assert torch.get_num_threads() == 1
        assert (torch.get_num_threads(), quant._threads(quant.THREADED_WEIGHTS)) == (2, 2)
        with quant.cores_to_pool(quant.PRODUCT_ROWS + 1):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="boom"), quant.cores_to_pool(1):
            raise RuntimeError("boom")
        assert torch.get_num_threads() == 2 and quant._pool_threads is None
        torch.set_num_threads(1)
        with quant.cores_to_pool(1):
            assert (torch.get_num_threads(), quant._threads(quant.THREADED_WEIGHTS)) == (1, 1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("type_name", QUANTISED)
def test_bf16_tiles_multiply_the_bf16_rounded_operands(kernels, monkeypatch, type_name):
    """With bf16 tiles (AMX hosts choose them) a larger product is x and the expanded weights each rounded
    to bf16, multiplied with float32 sums and rounded to bf16 once: within 2^-8 of the exact product of the
    rounded operands, plus float32 slack, and a float32 part of the layer stays exact."""
    monkeypatch.setenv("AIGC_QUANT_TILES", "bfloat16")
    monkeypatch.setattr(quant, "TILE_FLOATS", 8 * 3 * TYPES[type_name].block)
    cols = 3 * TYPES[type_name].block
    data, plain = blocks_of(type_name, 37, cols, seed=3), torch.randn(5, cols)
    layer = QuantLinear([Part(type_name, data, 37, cols), Part("F32", plain, 5, cols)], None)
    x = torch.randn(quant.PRODUCT_ROWS + 8, cols)
    with torch.no_grad():
        ours = layer(x)
    weight = dequantize(data, type_name, cols).to(torch.bfloat16).double()
    exact = x.to(torch.bfloat16).double() @ weight.T
    slack = 1e-5 * (x.abs().double() @ weight.abs().T)
    assert ((ours[:, :37].double() - exact).abs() <= exact.abs() / 256 + slack).all()
    assert not torch.equal(ours[:, :37], F.linear(x, dequantize(data, type_name, cols)))  # bf16, not float32
    torch.testing.assert_close(ours[:, 37:], x @ plain.T)


def test_tiles_are_bf16_on_amx_and_as_the_environment_says(monkeypatch):
    monkeypatch.delenv("AIGC_QUANT_TILES", raising=False)
    for amx, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(quant, "cpu_has_amx_bf16", lambda amx=amx: amx)
        assert quant.tile_dtype() == dtype
    monkeypatch.setenv("AIGC_QUANT_TILES", "bfloat16")
    assert quant.tile_dtype() == torch.bfloat16
    monkeypatch.setenv("AIGC_QUANT_TILES", "fp16")
    with pytest.raises(AigcError, match="AIGC_QUANT_TILES='fp16' is not known; use auto, float32 or bfloat16"):
        quant.tile_dtype()
