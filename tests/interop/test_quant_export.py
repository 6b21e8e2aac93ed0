"""`aigc export RUN --format q8_0 | q4 ...`: a quantised run of our own fp32 run, computed with as an
imported GGUF is; its logits are those of the fp32 model with gguf's round trip of each weight."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

from aigc.artifacts.run import read_run_config
from aigc.cli import main
from aigc.models import load_run
from aigc.models.qlinear import QuantLinear

PROMPT = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])


def round_trip(weight: torch.Tensor, type_name: str) -> torch.Tensor:
    kind = GGMLQuantizationType[type_name]
    return torch.from_numpy(np.array(dequantize(quantize(weight.detach().numpy(), kind), kind))).view(weight.shape)


@pytest.mark.parametrize("fmt, type_name", [("q8_0", "Q8_0"), ("q4", "Q4_0"), ("q5_1", "Q5_1")])
@pytest.mark.parametrize("style", [{}, {"norm": "rmsnorm", "positions": "rotary", "mlp": "swiglu", "bias": False}])
def test_export_gives_the_logits_of_the_rounded_weights(make_run, tmp_path, fmt, type_name, style, float_products):
    source = make_run(**style)
    assert main(["export", str(source), "--format", fmt, "--out", str(tmp_path / "q")]) == 0
    config = read_run_config(tmp_path / "q")
    assert config.weights.format == "quantized"
    assert set(config.weights.quantization["weights_by_type"]) == {type_name, "Q8_0"}
    quantised = load_run(tmp_path / "q").model
    assert isinstance(quantised.h[0].mlp.c_fc, QuantLinear) and quantised.h[0].mlp.c_fc.types == [type_name]
    reference = load_run(source).model
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(round_trip(module.weight, type_name))
        reference.wte.weight.copy_(round_trip(reference.wte.weight, "Q8_0"))  # tied: the head too
        torch.testing.assert_close(quantised(PROMPT)[0], reference(PROMPT)[0], rtol=1e-4, atol=1e-4)


def test_export_of_a_quantised_or_lstm_run_is_refused_in_one_line(make_run, tmp_path, capsys):
    source = make_run()
    assert main(["export", str(source), "--format", "q4", "--out", str(tmp_path / "q")]) == 0
    for fmt in ("q8_0", "int8", "hf"):
        assert main(["export", str(tmp_path / "q"), "--format", fmt, "--out", str(tmp_path / fmt)]) == 2
        assert "holds block-quantised weights" in capsys.readouterr().err
    lstm = make_run(kind="lstm", name="lstm")
    assert main(["export", str(lstm), "--format", "q4", "--out", str(tmp_path / "l")]) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a transformer run" in err and "LSTM" in err and "\n" not in err


def test_a_quantised_run_where_fp32_weights_are_needed_names_the_way_out(make_run, tmp_path):
    from aigc.artifacts.run import require_plain_weights
    from aigc.errors import AigcError

    assert main(["export", str(make_run()), "--format", "q8_0", "--out", str(tmp_path / "q")]) == 0
    with pytest.raises(AigcError, match="GGUF export: .* holds block-quantised weights.*--dequantize"):
        require_plain_weights(read_run_config(tmp_path / "q"), tmp_path / "q", "GGUF export")
