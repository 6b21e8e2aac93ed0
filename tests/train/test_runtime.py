import json
import os
import threading
import time

import torch

from aigc.artifacts import heap
from aigc.train import precision as device
from aigc.train.loop import train
from aigc.train.runtime import auto_threads, busy_cores
from conftest import tiny_train_config


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_busy_cores_sees_a_spinning_thread_at_once():
    """A busy core shows up immediately, not after the load average catches up a minute later."""
    cores = os.cpu_count() or 1
    spinner = threading.Thread(target=_spin, args=(1.0,))
    spinner.start()
    try:
        busy = busy_cores(interval_s=0.5)
    finally:
        spinner.join()
    assert 0.5 <= busy <= cores
    assert 1 <= auto_threads() <= cores


def test_dtype_auto_probes_once_and_picks_bf16_only_where_it_is_clearly_faster(monkeypatch, tmp_path):
    monkeypatch.setenv("AIGC_HOME", str(tmp_path))
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    calls = []

    def probe(rates):
        monkeypatch.setattr(device, "probe_rates", lambda: calls.append(rates) or rates)

    probe({"fp32": 300.0, "bf16": 1800.0})
    first = device.choose_training_dtype("auto", torch.device("cpu"))
    again = device.choose_training_dtype("auto", torch.device("cpu"))
    assert first == again and first.dtype == "bf16" and "6.0x" in first.reason
    assert len(calls) == 1 and device.probe_path().is_file()  # measured once, then read from the cache
    device.probe_path().unlink()
    probe({"fp32": 300.0, "bf16": 330.0})  # a CPU that claims bf16 but barely gains from it
    assert device.choose_training_dtype("auto", torch.device("cpu")).dtype == "fp32"
    assert device.choose_training_dtype("bf16", torch.device("cpu")) == device.PrecisionChoice("bf16", "--dtype bf16")


def test_the_run_records_the_chosen_dtype_and_why(tiny_data, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(device, "probe_rates", lambda: {"fp32": 100.0, "bf16": 50.0})
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    events = []
    run = train(
        tiny_data, tmp_path / "run", tiny_model, tiny_train_config(max_steps=1, eval_every=1), on_event=events.append
    )
    precision = json.loads((run / "config.json").read_text())["extra"]["precision"]
    assert precision["dtype"] == "fp32" and "0.5x" in precision["reason"]
    assert any("--dtype auto chose fp32" in note for note in events[0].notes)


def test_training_on_the_cpu_keeps_freed_memory_until_it_ends(tiny_data, tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("AIGC_KEEP_FREED_MEMORY", raising=False)
    held = []
    train(
        tiny_data,
        tmp_path / "run",
        tiny_model,
        tiny_train_config(max_steps=2, eval_every=2),
        on_event=lambda event: held.append(heap.holders()),
    )
    assert held and set(held) == {1 if heap.enabled() else 0}
    assert heap.holders() == 0
