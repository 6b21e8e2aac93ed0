"""int8 with per-token activation scales: close to fp32 even where one token carries a massive
activation (which a single per-call scale, the old torch.ao path, cannot survive), the float fallback
agrees with the int8 kernel, and folders of the old "dynamic-int8" method still load."""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from aigc.cli import main
from aigc.config import model_preset
from aigc.models import GPT, build_model, load_run
from aigc.models.int8 import Int8Linear, int8_state, quantize_int8
from aigc.models.packed import to_plain_linears

VOCAB = 50
OUTLIER_TOKEN = 0


def llama_with_outlier(seed: int = 0, size: float = 12.0) -> GPT:
    """A tiny Llama whose layer-0 SwiGLU output is ~size^2 x n_embd on OUTLIER_TOKEN and O(1) elsewhere,
    like the massive activations of SmolLM2 (2,490 vs ~1 at h.11.mlp.c_proj)."""
    torch.manual_seed(seed)
    model = build_model(model_preset("llama-tiny", vocab_size=VOCAB)).eval()
    with torch.no_grad():
        model.wte.weight[:, 0] = 0.0  # channel 0 is silent for every token ...
        model.wte.weight[OUTLIER_TOKEN] = 0.0
        model.wte.weight[OUTLIER_TOKEN, 0] = 1.0  # ... but the outlier token, which is all channel 0
        fc = model.h[0].mlp.c_fc.weight  # (2 * ffn_hidden, C): gate rows, then up rows
        hidden = fc.shape[0] // 2
        for row in (0, hidden):  # unit 0's gate and up read channel 0 only
            fc[row] = 0.0
            fc[row, 0] = size
    return model


def _mlp_input_peaks(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """(T,) max |input| of layer 0's mlp.c_proj per position."""
    seen = []
    handle = model.h[0].mlp.c_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0][0].abs().amax(-1)))
    with torch.no_grad():
        model(idx)
    handle.remove()
    return seen[0]


def _old_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """The int8 path before per-token scales: torch.ao dynamic quantization, one activation scale per call."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic  # test-only reference

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = to_plain_linears(copy.deepcopy(model))  # torch.ao matches nn.Linear by exact type
        return quantize_dynamic(plain, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def _idx() -> torch.Tensor:
    idx = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    idx[:, 0] = OUTLIER_TOKEN  # like <|endoftext|> at the start of every SmolLM2 context
    return idx


def test_int8_per_token_stays_close_to_fp32_despite_an_activation_outlier():
    model, idx = llama_with_outlier(), _idx()
    peaks = _mlp_input_peaks(model, idx)
    assert peaks[0] > 100 * peaks[1:].max()  # the injected outlier is there
    with torch.no_grad():
        fp32 = model(idx)[0][:, 1:]  # (B, T - 1, V): the positions after the outlier token
        per_token = quantize_int8(model)(idx)[0][:, 1:]
        per_call = _old_dynamic_int8(model)(idx)[0][:, 1:]
    tolerance = 0.05 * fp32.abs().max()
    assert 0 < (per_token - fp32).abs().max() < tolerance
    assert (per_call - fp32).abs().max() > tolerance  # the old path's one scale fails the same bar
    assert torch.equal(per_token.argmax(-1), fp32.argmax(-1))


@pytest.mark.parametrize("tie", [True, False])
def test_int8_fallback_gives_the_outputs_of_the_int_mm_path(monkeypatch, tie):
    torch.manual_seed(1)
    model = quantize_int8(build_model(model_preset("llama-tiny", vocab_size=VOCAB, tie_embeddings=tie)).eval())
    idx = _idx()
    with torch.no_grad():
        fast = model(idx)[0]
        monkeypatch.setattr(Int8Linear, "fast", False)
        fallback = model(idx)[0]
    # Same int8 x int8 sums; only float rounding of the sums and rescaling can differ.
    assert torch.allclose(fallback, fast, rtol=1e-5, atol=1e-5 * fast.abs().max().item())


@pytest.mark.skipif(not Int8Linear.one_token_kernel, reason="no fbgemm in this torch build")
def test_int8_one_token_kernel_agrees_with_the_per_token_path():
    """A single token goes through fbgemm's kernel (its per-call scale is per-token there): close to _int_mm's."""
    torch.manual_seed(4)
    linear = torch.nn.Linear(64, 96, bias=True)
    fbgemm, int_mm = Int8Linear.from_linear(linear), Int8Linear.from_linear(linear)
    int_mm._packed = None  # this one takes the _int_mm path even for one token
    x = torch.randn(1, 1, 64)
    x[..., 3] = 40.0  # an outlier channel within the token: both paths scale by it alike
    with torch.no_grad():
        a, b, exact = fbgemm(x), int_mm(x), linear(x)
    assert a.shape == b.shape == (1, 1, 96)
    # Both round the token on a grid of ~40 / 127; each lands within 5 % of fp32, and so of the other.
    assert (a - exact).abs().max() < 0.05 * exact.abs().max() and (b - exact).abs().max() < 0.05 * exact.abs().max()
    assert 0 < (a - b).abs().max() < 0.05 * exact.abs().max()


def test_int8_set_weight_repacks_the_one_token_kernel():
    torch.manual_seed(5)
    first, second = torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(32, 16, bias=False)
    layer, target = Int8Linear.from_linear(first), Int8Linear.from_linear(second)
    layer.set_weight(target.weight, target.weight_scale)
    x = torch.randn(1, 32)
    with torch.no_grad():
        assert torch.equal(layer(x), target(x))


def test_int8_linear_rounds_each_token_on_its_own_scale():
    torch.manual_seed(2)
    linear = torch.nn.Linear(16, 8, bias=True)
    layer = Int8Linear.from_linear(linear)
    x = torch.randn(3, 16)
    x[0] *= 1000.0  # a huge row must not change the others' result
    with torch.no_grad():
        together, alone = layer(x), layer(x[1:])
    assert torch.allclose(together[1:], alone, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert (together - linear(x)).abs().max() < 0.02 * linear(x).abs().max()


def test_old_dynamic_int8_folder_still_loads(make_run, tmp_path):
    """A folder written by the old torch.ao exporter (method "dynamic-int8") opens with the same weights."""
    run_dir, out = make_run("gpt", seed=5), tmp_path / "old"
    assert main(["export", str(run_dir), "--format", "int8", "--out", str(out)]) == 0
    run = load_run(run_dir)
    old = _old_dynamic_int8(run.model)
    tensors = {}
    for name, module in old.named_modules():  # the old int8_state: int8 + per-row scale (+ bias) per layer
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            tensors[f"{name}.weight"] = module.weight().int_repr().contiguous()
            tensors[f"{name}.weight_scale"] = module.weight().q_per_channel_scales().float().contiguous()
            if module.bias() is not None:
                tensors[f"{name}.bias"] = module.bias().detach().contiguous()
    tensors |= {n: p.detach().contiguous() for n, p in old.named_parameters() if n != "wte.weight"}
    assert set(tensors) == set(int8_state(quantize_int8(run.model)))  # the stored format did not change
    save_file(tensors, str(out / "model.safetensors"))
    config = json.loads((out / "config.json").read_text())
    config["weights"]["quantization"]["method"] = "dynamic-int8"
    (out / "config.json").write_text(json.dumps(config))
    loaded = load_run(out).model
    assert torch.equal(loaded.lm_head.weight, tensors["lm_head.weight"])
    idx = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        fp32, int8 = run.model(idx)[0], loaded(idx)[0]
    assert 0 < (fp32 - int8).abs().max() < 0.05 * fp32.abs().max()


def test_load_int8_rejects_an_unknown_method(make_run, tmp_path, capsys):
    out = tmp_path / "int8"
    assert main(["export", str(make_run("gpt")), "--format", "int8", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    config["weights"]["quantization"]["method"] = "int4-awq"
    (out / "config.json").write_text(json.dumps(config))
    assert main(["generate", str(out), "--prompt", "Review", "--max-new-tokens", "2"]) == 2
    assert "aigc reads int8-per-token, dynamic-int8" in capsys.readouterr().err
