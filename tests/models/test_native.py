import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from aigc.config import model_preset
from aigc.models import build_model, native, packed
from aigc.models.gpt import apply_rotary
from aigc.models.native import KernelUnavailable
from aigc.models.packed import Linear

COMPILER = os.environ.get("CC") or "cc"
needs_compiler = pytest.mark.skipif(shutil.which(COMPILER) is None, reason=f"no C compiler {COMPILER!r}")
needs_onednn = pytest.mark.skipif(not packed.onednn_linear_available(), reason="this PyTorch has no oneDNN linear")


@pytest.fixture
def fresh_kernels():
    """`native.kernels()` asked anew inside the test, and forgotten after it."""
    native.kernels.cache_clear()
    yield
    native.kernels.cache_clear()


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    if shutil.which(COMPILER) is None:
        pytest.skip(f"no C compiler {COMPILER!r}")
    return native.build(tmp_path_factory.mktemp("kernels"), COMPILER)


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("n_out, n_in", [(1, 1), (7, 17), (576, 576), (300, 577)])  # 300 x 577: threaded
@pytest.mark.parametrize("with_bias", [True, False])
def test_products_equal_f_linear(kernels, rows, n_out, n_in, with_bias):
    generator = torch.Generator().manual_seed(rows * n_in)
    weight = torch.randn(n_out, n_in, generator=generator)
    bias = torch.randn(n_out, generator=generator) if with_bias else None
    x = torch.randn(rows, n_in, generator=generator)
    torch.testing.assert_close(kernels.linear(x, weight, bias), F.linear(x, weight, bias), atol=2e-5, rtol=1e-4)


def test_non_contiguous_inputs_are_refused(kernels):
    weight = torch.randn(8, 6)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.linear(torch.randn(6, 1).T, weight.T.contiguous().T, None)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.decode_attention(torch.randn(18, 2).T, torch.zeros(2, 2, 1, 4, 6), None, 1)


def test_arguments_the_c_code_would_overrun_are_refused(kernels):
    qkv, kv = torch.zeros(2, 8 * 6), torch.zeros(2, 2, 2, 5, 6)  # 4 query heads, 2 cached, capacity 5
    refused = {
        "position 5 outside": lambda: kernels.rope_append(qkv, None, kv, 5),
        "6 positions in a cache of 5": lambda: kernels.decode_attention(qkv, kv, None, 6),
        "valid .B, >= length.": lambda: kernels.decode_attention(qkv, kv, torch.ones(2, 2, dtype=torch.bool), 3),
        "valid needs contiguous bool": lambda: kernels.decode_attention(qkv, kv, torch.ones(2, 5), 3),
        "does not fit the cache": lambda: kernels.decode_attention(torch.zeros(2, 4 * 6), kv, None, 1),
        "contiguous float32": lambda: kernels.rope_append(qkv.double(), None, kv, 0),
        "1 or B float32 rows": lambda: kernels.rope_append(qkv, (torch.ones(3, 6), torch.ones(3, 6)), kv, 0),
        "rms_norm needs": lambda: kernels.rms_norm(torch.zeros(2, 6), torch.ones(5), 1e-5),
        "silu_mul needs": lambda: kernels.silu_mul(torch.zeros(2, 5)),
        "shapes do not match": lambda: kernels.linear(torch.zeros(1, 6), torch.zeros(3, 5), None),
    }
    for problem, call in refused.items():
        with pytest.raises(ValueError, match=problem):
            call()


@needs_compiler
def test_a_build_is_kept_and_reused_not_compiled_again(tmp_path, monkeypatch):
    first = native.build(tmp_path, COMPILER)

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(native, "_compile", no_compiling)
    assert native.build(tmp_path, COMPILER).library_path == first.library_path
    built = first.library_path.name
    assert sorted(p.name for p in tmp_path.iterdir()) == [built, built + ".json"]  # no temp files left
    monkeypatch.setattr(native, "cpu_identity", lambda: "another CPU")  # -march=native built for this one
    with pytest.raises(AssertionError, match="compiled again"):
        native.build(tmp_path, COMPILER)


def test_no_compiler_a_failed_build_and_an_unwritable_folder_say_why(tmp_path):
    with pytest.raises(KernelUnavailable, match="no C compiler 'no-such-cc'"):
        native.build(tmp_path, "no-such-cc")
    if shutil.which("false"):  # a "compiler" that always fails
        with pytest.raises(KernelUnavailable, match="false failed on native.c"):
            native.build(tmp_path / "kernels", "false")
        assert list((tmp_path / "kernels").iterdir()) == []  # the half-made file is gone
    (tmp_path / "a-file").write_text("")
    if shutil.which(COMPILER):
        with pytest.raises(KernelUnavailable, match="cannot write the kernels"):
            native.build(tmp_path / "a-file" / "kernels", COMPILER)


@needs_compiler
@pytest.mark.parametrize("name", ["linear", "rms_norm", "silu_mul", "decode_attention"])
def test_a_kernel_that_computes_wrong_results_is_refused(tmp_path, monkeypatch, name):
    right = getattr(native.Kernels, name)
    monkeypatch.setattr(native.Kernels, name, lambda self, *args: right(self, *args) + 1e-3)
    with pytest.raises(KernelUnavailable, match=f"computes {name} wrong"):
        native.build(tmp_path, COMPILER)


@needs_compiler
def test_a_rotation_that_writes_the_wrong_place_is_refused(tmp_path, monkeypatch):
    right = native.Kernels.rope_append

    def one_position_late(self, qkv, rope, kv, at):
        right(self, qkv, rope, kv, at + 1)

    monkeypatch.setattr(native.Kernels, "rope_append", one_position_late)
    with pytest.raises(KernelUnavailable, match="computes rope_append wrong"):
        native.build(tmp_path, COMPILER)


def test_the_environment_can_turn_them_off_and_the_home_holds_the_build(tmp_path, monkeypatch, fresh_kernels):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path))
    monkeypatch.setenv("AIGC_NATIVE_KERNELS", "0")
    assert native.kernels() is None
    assert "AIGC_NATIVE_KERNELS=0" in native.unavailable_reason()
    native.kernels.cache_clear()
    monkeypatch.setenv("AIGC_NATIVE_KERNELS", "1")
    monkeypatch.setenv("CC", "no-such-cc")
    assert native.kernels() is None and "no C compiler" in native.unavailable_reason()
    if shutil.which(COMPILER):
        native.kernels.cache_clear()
        monkeypatch.setenv("CC", COMPILER)
        assert native.kernels().library_path.parent == tmp_path / "kernels"


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
def test_linear_takes_the_native_path_for_up_to_two_rows_with_the_same_logits(preset, kernels, monkeypatch):
    torch.manual_seed(0)
    model = build_model(model_preset(preset, vocab_size=50)).eval()
    idx = torch.randint(0, 50, (2, 8))
    monkeypatch.setattr(native, "kernels", lambda: None)
    reference = decode_logits(model, idx)  # oneDNN throughout
    calls = []

    class Counted(native.Kernels):
        def linear(self, x, weight, bias):
            calls.append(x.shape[0])
            return super().linear(x, weight, bias)

    counted = Counted(kernels.library_path)
    monkeypatch.setattr(native, "kernels", lambda: counted)
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


@pytest.mark.parametrize("shape", [(1, 1, 7), (16, 1, 576), (3, 5, 33), (200, 577)])  # the last threaded
def test_rms_norm_equals_pytorch(kernels, shape):
    generator = torch.Generator().manual_seed(shape[-1])
    x, weight = 3 * torch.randn(*shape, generator=generator), torch.randn(shape[-1], generator=generator)
    expected = F.rms_norm(x, (shape[-1],), weight, 1e-5)
    torch.testing.assert_close(kernels.rms_norm(x, weight, 1e-5), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernels.rms_norm(x.transpose(0, -2), weight, 1e-5), expected.transpose(0, -2))


@pytest.mark.parametrize("shape", [(1, 1, 2), (16, 1, 3072), (3, 2 * 37), (40, 2 * 1000)])  # the last threaded
def test_silu_mul_equals_pytorch_over_the_whole_range_of_exp(kernels, shape):
    generator = torch.Generator().manual_seed(shape[-1])
    h = torch.randn(*shape, generator=generator, dtype=torch.float64)
    h[..., : shape[-1] // 2] *= 40  # gates out to about +-150: past where exp(-gate) under- and overflows
    gate, up = h.chunk(2, dim=-1)
    expected = (F.silu(gate) * up).float()  # float64 reference
    ours = kernels.silu_mul(h.float())
    assert ours.shape == expected.shape and torch.isfinite(ours).all()
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def rotate_like_the_model(x, cos, sin):
    """Reference rotation of (B, h, hs) heads: the model's `apply_rotary` on its (B, h, T=1, hs) layout."""
    return apply_rotary(x.unsqueeze(2), cos.unsqueeze(1).unsqueeze(1), sin.unsqueeze(1).unsqueeze(1)).squeeze(2)


@pytest.mark.parametrize("rows_of_angles", [3, 1, 0])  # one per batch row, one shared, no rotation
def test_rope_append_rotates_queries_in_place_and_appends_keys_and_values(kernels, rows_of_angles):
    B, n_head, n_kv_head, head_dim, at = 3, 6, 2, 10, 4
    generator = torch.Generator().manual_seed(rows_of_angles)
    qkv = torch.randn(B, (n_head + 2 * n_kv_head) * head_dim, generator=generator)
    kv = torch.randn(2, B, n_kv_head, 7, head_dim, generator=generator)
    angles = torch.randn(max(rows_of_angles, 1), head_dim, generator=generator)
    rope = (angles.cos().view(-1, 1, 1, head_dim), angles.sin().view(-1, 1, 1, head_dim)) if rows_of_angles else None
    heads = qkv.view(B, n_head + 2 * n_kv_head, head_dim).clone()
    q, k, v = heads.split([n_head, n_kv_head, n_kv_head], dim=1)
    keys_and_values = heads[:, n_head:].clone()
    if rope is not None:
        q, k = (rotate_like_the_model(t, angles.cos().expand(B, -1), angles.sin().expand(B, -1)) for t in (q, k))
    untouched = kv.clone()
    kernels.rope_append(qkv, rope, kv, at)
    torch.testing.assert_close(qkv.view(B, -1, head_dim)[:, :n_head], q)
    assert torch.equal(qkv.view(B, -1, head_dim)[:, n_head:], keys_and_values)  # rotated into the cache only
    torch.testing.assert_close(kv[0, :, :, at], k)
    torch.testing.assert_close(kv[1, :, :, at], v)
    kv[:, :, :, at] = untouched[:, :, :, at]
    assert torch.equal(kv, untouched)  # nothing else written


@pytest.mark.parametrize("n_head, n_kv_head", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("length", [1, 5, 300])  # 300 with 8 rows: threaded
@pytest.mark.parametrize("padded", [False, True])
def test_decode_attention_equals_sdpa_with_the_models_mask(kernels, n_head, n_kv_head, length, padded):
    B, head_dim, capacity = 8, 16, 310
    generator = torch.Generator().manual_seed(length + n_head)
    qkv = torch.randn(B, (n_head + 2 * n_kv_head) * head_dim, generator=generator)
    kv = torch.randn(2, B, n_kv_head, capacity, head_dim, generator=generator)
    valid = torch.rand(B, capacity, generator=generator) < 0.6 if padded else None
    if padded:
        valid[0] = False  # a row with nothing valid still sees its own (last) position
    q = qkv[:, : n_head * head_dim].view(B, n_head, 1, head_dim)
    mask = None
    if padded:
        mask = valid[:, :length].clone()
        mask[:, -1] = True
        mask = mask[:, None, None]  # (B, 1, 1, S)
    keys, values = kv[0, :, :, :length], kv[1, :, :, :length]
    expected = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=n_head != n_kv_head)
    ours = kernels.decode_attention(qkv, kv, valid, length)
    torch.testing.assert_close(ours, expected.reshape(B, -1), atol=1e-5, rtol=1e-4)


def test_for_inference_keeps_training_gpus_and_other_dtypes_on_pytorch(monkeypatch):
    sentinel = object()
    monkeypatch.setattr(native, "kernels", lambda: sentinel)
    x = torch.zeros(2, 3)
    with torch.no_grad():
        assert native.for_inference(x) is sentinel
        assert native.for_inference(x.bfloat16()) is None
        assert native.for_inference(x.to("meta")) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert native.for_inference(x) is None
    assert native.for_inference(x) is None  # autograd on: training


def padded_decode(model, prompts, steps=4):
    """Left-padded prompts of different lengths, then greedy one-token steps: every step's logits."""
    width = max(len(p) for p in prompts)
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    pad_mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    positions = (pad_mask.long().cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        cache = model.new_cache(len(prompts))
        logits = [model(idx, cache=cache, positions=positions, pad_mask=pad_mask, last_only=True)[0]]
        for _ in range(steps):
            positions = positions[:, -1:] + 1
            logits.append(model(logits[-1][:, -1].argmax(-1, keepdim=True), cache=cache, positions=positions)[0])
    return logits


@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_a_padded_batch_decodes_to_the_same_logits_with_and_without_the_native_kernels(preset, kernels, monkeypatch):
    torch.manual_seed(0)
    model = build_model(model_preset(preset, vocab_size=50)).eval()
    prompts = [[5, 6, 7, 8, 9], [10], [11, 12, 13]]
    monkeypatch.setattr(native, "kernels", lambda: None)
    reference = padded_decode(model, prompts)
    calls = []

    class Counted(native.Kernels):
        def decode_attention(self, *args):
            calls.append("attention")
            return super().decode_attention(*args)

        def rms_norm(self, *args):
            calls.append("norm")
            return super().rms_norm(*args)

    counted = Counted(kernels.library_path)
    monkeypatch.setattr(native, "kernels", lambda: counted)
    for ours, expected in zip(padded_decode(model, prompts), reference):
        torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
    layers = model.config.n_layer
    assert calls.count("attention") == 4 * layers  # every decode step, never the prefill
    assert calls.count("norm") == (5 * (2 * layers + 1) if preset == "llama-tiny" else 0)  # GPT-2: LayerNorm
