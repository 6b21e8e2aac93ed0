import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from aigc.artifacts.state import load_state
from aigc.errors import AigcError
from aigc.models import load_run
from aigc.train import events
from aigc.train.loop import train
from conftest import tiny_train_config

METRIC_KEYS = {
    "step",
    "tokens",
    "elapsed_s",
    "lr",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_ppl",
    "val_bpb",
    "val_acc",
    "tokens_per_s",
}
TIMING_KEYS = {"elapsed_s", "tokens_per_s"}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_train_writes_a_complete_run_folder(tiny_data, tiny_model, tmp_path):
    seen = []
    run_dir = train(tiny_data, tmp_path / "run", tiny_model, tiny_train_config(), on_event=seen.append)
    for name in (
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "best.safetensors",
        "state.pt",
        "plots/loss.png",
        "plots/accuracy.png",
    ):
        assert (run_dir / name).is_file(), name
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [3, 6]
    assert METRIC_KEYS <= set(records[0])
    assert records[-1]["val_loss"] < records[0]["val_loss"] < math.log(tiny_model.vocab_size) + 0.5
    assert records[-1]["val_ppl"] == pytest.approx(math.exp(records[-1]["val_loss"]))
    assert 0 < records[-1]["val_bpb"] < records[-1]["val_loss"]  # several bytes per token
    kinds = [type(e).__name__ for e in seen]
    assert kinds[0] == "TrainStart" and kinds[-1] == "TrainEnd" and kinds.count("TrainStep") == 6
    assert kinds.count("TrainEval") == 2
    run = load_run(run_dir)
    assert run.config.data["path"] == str(tiny_data.resolve())
    assert run.config.model.vocab_size == run.tokenizer.vocab_size


def test_train_lstm_learns(tiny_data, tiny_model, tmp_path):
    import dataclasses

    config = dataclasses.replace(tiny_model, kind="lstm")
    run_dir = train(
        tiny_data, tmp_path / "lstm", config, tiny_train_config(max_steps=8, eval_every=4, learning_rate=1e-2)
    )
    records = _metrics(run_dir)
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    assert load_run(run_dir).config.model.kind == "lstm"


def _stop_at(step):
    def callback(event):
        if isinstance(event, events.TrainStep) and event.step == step:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("stop_step", [4, 6])  # between evaluations, and right on one
def test_train_interrupted_and_resumed_matches_uninterrupted_bitwise(tiny_data, tiny_model, tmp_path, stop_step):
    # One thread for both runs: `threads=0` picks the cores the machine's load leaves free at each start,
    # and sums split over a different thread count round differently (bitwise holds at equal threads).
    config = tiny_train_config(max_steps=9, eval_every=3, grad_accum=2, threads=1)
    whole = train(tiny_data, tmp_path / "whole", tiny_model, config)
    with pytest.raises(events.TrainingInterrupted) as stopped:
        train(tiny_data, tmp_path / "split", tiny_model, config, on_event=_stop_at(stop_step))
    assert stopped.value.step == stop_step
    assert load_state(tmp_path / "split")["step"] == stop_step
    resumed = train(None, tmp_path / "split", resume=True)
    a, b = load_file(whole / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _without_timing(_metrics(whole)) == _without_timing(_metrics(resumed))


def test_train_ctrl_c_finishes_the_step_and_saves(tiny_data, tiny_model, tmp_path):
    def press_ctrl_c(event):
        if isinstance(event, events.TrainStep) and event.step == 2:
            os.kill(os.getpid(), signal.SIGINT)  # handled: the loop stops at the next step boundary

    with pytest.raises(events.TrainingInterrupted) as stopped:
        train(tiny_data, tmp_path / "run", tiny_model, tiny_train_config(max_steps=50), on_event=press_ctrl_c)
    assert stopped.value.step == 2
    assert load_state(tmp_path / "run")["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler, "handler restored"
    load_run(tmp_path / "run")


def test_train_stops_on_nan_and_keeps_the_last_good_checkpoint(tiny_data, tiny_model, tmp_path):
    def poison(event):
        if isinstance(event, events.TrainEval):
            with torch.no_grad():
                next(event.model.parameters()).fill_(float("nan"))

    with pytest.raises(AigcError, match=r"NaN/inf at step 4.*step 3.*--learning-rate"):
        train(tiny_data, tmp_path / "run", tiny_model, tiny_train_config(max_steps=9), on_event=poison)
    run = load_run(tmp_path / "run")
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
    assert load_state(tmp_path / "run")["step"] == 3


def test_train_refuses_to_clobber(tiny_data, tiny_model, tmp_path):
    run_dir = train(tiny_data, tmp_path / "run", tiny_model, tiny_train_config(max_steps=3))
    before = (run_dir / "model.safetensors").read_bytes()
    with pytest.raises(AigcError, match="already holds a run.*--resume.*--overwrite"):
        train(tiny_data, run_dir, tiny_model, tiny_train_config(max_steps=3, seed=1))
    assert (run_dir / "model.safetensors").read_bytes() == before
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(AigcError, match="not an aigc run"):
        train(tiny_data, foreign, tiny_model, tiny_train_config(max_steps=3), overwrite=True)
    assert (foreign / "cat.jpg").exists()
    train(tiny_data, run_dir, tiny_model, tiny_train_config(max_steps=3, seed=1), overwrite=True)
    assert (run_dir / "model.safetensors").read_bytes() != before
    assert [r["step"] for r in _metrics(run_dir)] == [3]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(block_size=4096), "val split has only"),
        (dict(batch_size=100_000), "train split has only"),
    ],
)
def test_train_rejects_batch_or_context_larger_than_data(tiny_data, tiny_model, tmp_path, change, message):
    import dataclasses

    model = dataclasses.replace(tiny_model, block_size=change.get("block_size", tiny_model.block_size))
    config = tiny_train_config(batch_size=change.get("batch_size", 4))
    with pytest.raises(AigcError, match=message):
        train(tiny_data, tmp_path / "run", model, config)
    assert not (tmp_path / "run").exists()


def test_train_needs_a_budget_and_a_dataset(tiny_data, tmp_path):
    with pytest.raises(AigcError, match="no training budget"):
        train(tiny_data, tmp_path / "run", train_config=tiny_train_config(max_steps=0))
    with pytest.raises(AigcError, match="not a prepared dataset"):
        train(tmp_path, tmp_path / "run", train_config=tiny_train_config())
    with pytest.raises(AigcError, match="data folder not found"):
        train(tmp_path / "missing", tmp_path / "run", train_config=tiny_train_config())
