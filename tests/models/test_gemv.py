import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from aigc.config import model_preset
from aigc.models import build_model, gemv, packed
from aigc.models.gemv import KernelUnavailable
from aigc.models.packed import Linear

COMPILER = os.environ.get("CC") or "cc"
needs_compiler = pytest.mark.skipif(shutil.which(COMPILER) is None, reason=f"no C compiler {COMPILER!r}")
needs_onednn = pytest.mark.skipif(not packed.onednn_linear_available(), reason="this PyTorch has no oneDNN linear")


@pytest.fixture
def fresh_kernel():
    """`gemv.kernel()` asked anew inside the test, and forgotten after it."""
    gemv.kernel.cache_clear()
    yield
    gemv.kernel.cache_clear()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    if shutil.which(COMPILER) is None:
        pytest.skip(f"no C compiler {COMPILER!r}")
    return gemv.build(tmp_path_factory.mktemp("kernels"), COMPILER)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("n_out, n_in", [(1, 1), (7, 17), (576, 576), (300, 577)])  # 300 x 577: threaded
@pytest.mark.parametrize("with_bias", [True, False])
def test_products_equal_f_linear(kernel, rows, n_out, n_in, with_bias):
    generator = torch.Generator().manual_seed(rows * n_in)
    weight = torch.randn(n_out, n_in, generator=generator)
    bias = torch.randn(n_out, generator=generator) if with_bias else None
    x = torch.randn(rows, n_in, generator=generator)
    torch.testing.assert_close(kernel(x, weight, bias), F.linear(x, weight, bias), atol=2e-5, rtol=1e-4)


def test_non_contiguous_inputs_are_refused(kernel):
    weight = torch.randn(8, 6)
    with pytest.raises(ValueError, match="contiguous"):
        kernel(torch.randn(6, 1).T, weight.T.contiguous().T, None)


@needs_compiler
def test_a_build_is_kept_and_reused_not_compiled_again(tmp_path, monkeypatch):
    first = gemv.build(tmp_path, COMPILER)

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(gemv.subprocess, "run", no_compiling)
    assert gemv.build(tmp_path, COMPILER).library_path == first.library_path
    assert [p.name for p in tmp_path.iterdir()] == [first.library_path.name]  # no temp files left
    monkeypatch.setattr(gemv, "cpu_identity", lambda: "another CPU")  # -march=native built for this one
    with pytest.raises(AssertionError, match="compiled again"):
        gemv.build(tmp_path, COMPILER)


def test_no_compiler_a_failed_build_and_an_unwritable_folder_say_why(tmp_path):
    with pytest.raises(KernelUnavailable, match="no C compiler 'no-such-cc'"):
        gemv.build(tmp_path, "no-such-cc")
    if shutil.which("false"):  # a "compiler" that always fails
        with pytest.raises(KernelUnavailable, match="false failed on gemv.c"):
            gemv.build(tmp_path / "kernels", "false")
        assert list((tmp_path / "kernels").iterdir()) == []  # the half-made file is gone
    (tmp_path / "a-file").write_text("")
    if shutil.which(COMPILER):
        with pytest.raises(KernelUnavailable, match="cannot write the kernel"):
            gemv.build(tmp_path / "a-file" / "kernels", COMPILER)


@needs_compiler
def test_a_kernel_that_computes_wrong_products_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(gemv.Gemv, "__call__", lambda self, x, weight, bias: torch.zeros(x.shape[0], weight.shape[0]))
    with pytest.raises(KernelUnavailable, match="wrong products"):
        gemv.build(tmp_path, COMPILER)


def test_the_environment_can_turn_it_off_and_the_home_holds_the_build(tmp_path, monkeypatch, fresh_kernel):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path))
    monkeypatch.setenv("AIGC_NATIVE_KERNELS", "0")
    assert gemv.kernel() is None
    assert "AIGC_NATIVE_KERNELS=0" in gemv.unavailable_reason()
    gemv.kernel.cache_clear()
    monkeypatch.setenv("AIGC_NATIVE_KERNELS", "1")
    monkeypatch.setenv("CC", "no-such-cc")
    assert gemv.kernel() is None and "no C compiler" in gemv.unavailable_reason()
    if shutil.which(COMPILER):
        gemv.kernel.cache_clear()
        monkeypatch.setenv("CC", COMPILER)
        assert gemv.kernel().library_path.parent == tmp_path / "kernels"


def decode_logits(model, idx):
    """Logits of a prefill, then of 1-row and 2-row decode steps, with autograd off."""
    with torch.no_grad():
        cache = model.new_cache(1)
        logits = [model(idx[:1, :4], cache=cache)[0]]
        for step in range(4, idx.shape[1]):
            logits.append(model(idx[:1, step : step + 1], cache=cache)[0])
        logits.append(model(idx[:, :1])[0])  # two rows of one token: the native path too
    return logits


@needs_onednn
@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_linear_takes_the_native_path_for_up_to_two_rows_with_the_same_logits(preset, kernel, monkeypatch):
    torch.manual_seed(0)
    model = build_model(model_preset(preset, vocab_size=50)).eval()
    idx = torch.randint(0, 50, (2, 8))
    monkeypatch.setattr(gemv, "kernel", lambda: None)
    reference = decode_logits(model, idx)  # oneDNN throughout
    calls = []

    def counted(x, weight, bias):
        calls.append(x.shape[0])
        return kernel(x, weight, bias)

    monkeypatch.setattr(gemv, "kernel", lambda: counted)
    for layer in model.modules():
        if isinstance(layer, Linear):
            layer.packed_copy.clear()
    with torch.no_grad():
        for logits, expected in zip(decode_logits(model, idx), reference):
            torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-4)
    linears = sum(isinstance(m, Linear) for m in model.modules())
    assert sorted(set(calls)) == [1, 2] and len(calls) == linears * 5  # 4 one-row steps and the 2-row call
    # Only the 4-token prefill went through oneDNN and packed a copy.
    assert all(m.packed_copy.packed is not None for m in model.modules() if isinstance(m, Linear))
