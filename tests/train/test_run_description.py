"""What a run says about its model and its machine: a LoRA fine-tune of a Llama-shaped base records its
parameter counts and the hardware it trained on, and its report shows the family, the total and the
trainable parameters, and that hardware."""

from __future__ import annotations

import json

from tests.train.conftest import tiny_train_config

from aigc.artifacts.hardware import CPU_FLAGS, cpu_name
from aigc.config import LLAMA_STYLE
from aigc.models import load_run
from aigc.report import write_report
from aigc.train.loop import train


def test_a_lora_run_records_counts_and_hardware_and_its_report_names_family_and_both_counts(
    make_run, tiny_data, tmp_path
):
    base = make_run(name="base", **LLAMA_STYLE)
    config = tiny_train_config(
        max_steps=2, eval_every=2, lora_rank=4, lora_targets=("c_attn",), threads=1, dtype="fp32", device="cpu"
    )
    run_dir = train(tiny_data, tmp_path / "lora", None, config, init_from=base)

    extra = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["extra"]
    total = load_run(base).model.num_params()
    trainable = extra["parameters"]["trainable"]
    assert extra["parameters"]["total"] == total + trainable and 0 < trainable < total / 10
    hardware = extra["hardware"]
    assert hardware["cpu"] == cpu_name() and set(hardware["cpu_flags"]) <= set(CPU_FLAGS)
    assert (hardware["threads"], hardware["device"], hardware["dtype"]) == (1, "cpu", "fp32")

    md_path, _ = write_report(run_dir)
    summary = md_path.read_text(encoding="utf-8").split("## Summary")[1].split("##")[0]
    model_row = next(line for line in summary.splitlines() if line.startswith("| model |"))
    expected = f"Llama: {(total + trainable) / 1e6:.2f} M parameters ({trainable / 1e6:.2f} M trainable); 2 layers"
    assert expected in model_row and "GPT" not in model_row
    hardware_row = next(line for line in summary.splitlines() if line.startswith("| hardware |"))
    assert cpu_name() in hardware_row and "1 thread of" in hardware_row and "device cpu, fp32" in hardware_row
    assert "not recorded" not in hardware_row
    assert extra["precision"] == {"dtype": "fp32", "reason": "--dtype fp32"}  # why this precision, shown too
    assert "(precision: --dtype fp32)" in hardware_row
