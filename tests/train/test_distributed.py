"""Data parallel on CPU: `torchrun --nproc_per_node=2 -m aigc train` with batch B per process follows
the same loss curve as one process with batch 2B (each process takes its half of the same draws),
for full training and for a LoRA fine-tune of a Llama-style model (fused training ops included)."""

import json
import os
import subprocess
import sys

import pytest

from aigc.cli import main
from aigc.config import model_preset
from aigc.train.loop import train
from conftest import tiny_train_config

ARGS = [
    "--preset",
    "tiny",
    "--block-size",
    "32",
    "--max-steps",
    "6",
    "--eval-every",
    "3",
    "--eval-batches",
    "2",
    "--warmup-steps",
    "2",
    "--learning-rate",
    "3e-3",
    "--sample-tokens",
    "0",
    "--quiet",
]


def torchrun(out, data, batch_size: int, args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "aigc",
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--batch-size",
        str(batch_size),
        *args,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[:3000]


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_two_processes_match_one_with_the_same_global_batch(tiny_data, tiny_tokenizer, tmp_path):
    llama = model_preset("llama-tiny", block_size=32, vocab_size=tiny_tokenizer.vocab_size)
    base = train(tiny_data, tmp_path / "base", llama, tiny_train_config(max_steps=2, eval_every=2))
    lora = ["--init-from", str(base), "--lora-rank", "4", "--dtype", "fp32"]
    args = ARGS[ARGS.index("--max-steps") :] + lora  # the model shape comes from the base
    torchrun(tmp_path / "ddp", tiny_data, 2, args)
    config = tiny_train_config(batch_size=4, lora_rank=4, dtype="fp32")
    single = train(tiny_data, tmp_path / "single", train_config=config, init_from=base)
    ddp_metrics, one_metrics = metrics(tmp_path / "ddp"), metrics(single)
    assert [m["step"] for m in ddp_metrics] == [m["step"] for m in one_metrics] == [3, 6]
    for a, b in zip(ddp_metrics, one_metrics):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert one_metrics[-1]["val_loss"] < one_metrics[0]["val_loss"]  # it learned: the match is not trivial


@pytest.mark.slow
def test_qlora_two_processes_match_one_with_the_same_global_batch(tiny_data, tiny_tokenizer, tmp_path):
    """LoRA over a Q4_0 export of the base: the frozen blocks (buffers, not parameters) are the same
    on every rank, and the two processes train as one."""
    llama = model_preset("llama-tiny", block_size=32, vocab_size=tiny_tokenizer.vocab_size)
    base = train(tiny_data, tmp_path / "base", llama, tiny_train_config(max_steps=2, eval_every=2))
    assert main(["export", str(base), "--format", "q4", "--out", str(tmp_path / "q4")]) == 0
    lora = ["--init-from", str(tmp_path / "q4"), "--lora-rank", "4", "--dtype", "fp32"]
    torchrun(tmp_path / "ddp", tiny_data, 2, ARGS[ARGS.index("--max-steps") :] + lora)
    config = tiny_train_config(batch_size=4, lora_rank=4, dtype="fp32")
    single = train(tiny_data, tmp_path / "single", train_config=config, init_from=tmp_path / "q4")
    ddp_metrics, one_metrics = metrics(tmp_path / "ddp"), metrics(single)
    assert [m["step"] for m in ddp_metrics] == [m["step"] for m in one_metrics] == [3, 6]
    for a, b in zip(ddp_metrics, one_metrics):
        for key in ("train_loss", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert one_metrics[-1]["val_loss"] < one_metrics[0]["val_loss"]


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_data, tiny_model, tmp_path):
    torchrun(tmp_path / "ddp", tiny_data, 2, ARGS)
    single = train(tiny_data, tmp_path / "single", tiny_model, tiny_train_config(batch_size=4))
    ddp_metrics, one_metrics = metrics(tmp_path / "ddp"), metrics(single)
    assert [m["step"] for m in ddp_metrics] == [m["step"] for m in one_metrics] == [3, 6]
    for a, b in zip(ddp_metrics, one_metrics):
        assert a["tokens"] == b["tokens"]
        for key in ("train_loss", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert one_metrics[-1]["val_loss"] < one_metrics[0]["val_loss"]  # it learned: the match is not trivial
