"""Data parallel on CPU: `torchrun --nproc_per_node=2 -m aigc train` with batch B per process follows
the same loss curve as one process with batch 2B (each process takes its half of the same draws)."""

import json
import os
import subprocess
import sys

import pytest

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


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tiny_data, tiny_model, tmp_path):
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
        str(tiny_data),
        "--out",
        str(tmp_path / "ddp"),
        "--batch-size",
        "2",
        *ARGS,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    single = train(tiny_data, tmp_path / "single", tiny_model, tiny_train_config(batch_size=4))
    ddp_metrics = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    one_metrics = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp_metrics] == [m["step"] for m in one_metrics] == [3, 6]
    for a, b in zip(ddp_metrics, one_metrics):
        assert a["tokens"] == b["tokens"]
        for key in ("train_loss", "val_loss", "val_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert one_metrics[-1]["val_loss"] < one_metrics[0]["val_loss"]  # it learned: the match is not trivial
