import json

import pytest
import torch

from aigc.cli import main

TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "2"]


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), *TINY, *extra])


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_cli_train_prints_evaluations_and_samples_then_resumes(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_data, run, "--max-steps", "4", "--eval-every", "2", "--sample-tokens", "6") == 0
    err = capsys.readouterr().err
    assert "training (GPT-2: " in err and "2 layers × 64, 2 heads, context 32" in err
    assert "step 2: train loss" in err and "val bpb" in err
    assert "[pos]" in err and "[neg]" in err
    assert "done (max-steps) at step 4" in err
    assert main(["train", "--resume", str(run), "--max-steps", "6", "--quiet"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["max_steps"] == 6 and config["model"]["n_layer"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/missing", "--out", "{tmp}/run", "--max-steps", "2"], "data folder not found"),
        (["--data", "{tmp}", "--out", "{tmp}/run", "--max-steps", "2"], "not a prepared dataset"),
        (["--data", "{data}", "--out", "{tmp}/run"], "no training budget"),
        (
            ["--data", "{data}", "--out", "{tmp}/run", "--max-steps", "2", "--learning-rate", "-1"],
            "--learning-rate must be > 0",
        ),
        (["--data", "{data}", "--max-steps", "2"], "--out is required"),
        (["--resume", "{tmp}/nope"], "run folder not found"),
    ],
)
def test_cli_train_bad_input_is_one_line_and_exit_2(tiny_data, tmp_path, capsys, args, message):
    argv = [a.format(tmp=tmp_path, data=tiny_data) for a in args]
    assert main(["train", *argv]) == 2
    line = _error_line(capsys)
    assert line.startswith("aigc train: error: ") and message in line


@pytest.mark.parametrize(("flag", "value"), [("--preset", "huge"), ("--dtype", "fp8"), ("--model", "rnn")])
def test_cli_train_unknown_choice_lists_the_valid_ones(tiny_data, tmp_path, capsys, flag, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", str(tiny_data), "--out", str(tmp_path / "run"), flag, value])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_train_resume_names_the_corrupted_file(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_data, run, "--max-steps", "2", "--eval-every", "2", "--quiet") == 0
    good = (run / "state.pt").read_bytes()
    (run / "state.pt").write_bytes(good[: len(good) // 2])
    assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 2
    assert "state.pt is corrupted" in _error_line(capsys)
    (run / "state.pt").write_bytes(good)
    (run / "config.json").write_text("{ not json")
    assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 2
    assert "config.json is corrupted" in _error_line(capsys)


def test_cli_train_existing_run_needs_resume_or_overwrite(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(tiny_data, run, "--max-steps", "2", "--quiet") == 0
    assert _train(tiny_data, run, "--max-steps", "2") == 2
    assert "--overwrite" in _error_line(capsys)
    assert main(["train", "--resume", str(run), "--n-layer", "3"]) == 2
    assert "drop the model options" in _error_line(capsys)
    assert _train(tiny_data, run, "--max-steps", "2", "--overwrite", "--quiet") == 0


def test_cli_train_tensorboard_writes_events_or_says_what_is_missing(tiny_data, tmp_path, capsys):
    try:
        import tensorboard  # noqa: F401

        installed = True
    except ImportError:
        installed = False
    code = _train(tiny_data, tmp_path / "run", "--max-steps", "2", "--eval-every", "2", "--tensorboard", "--quiet")
    if installed:
        assert code == 0
        assert any((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    else:
        assert code == 2
        assert "needs the tensorboard package" in _error_line(capsys)
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_train_killed_with_sigkill_leaves_a_loadable_resumable_run(tiny_data, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from aigc.models import load_run

    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "aigc",
        "train",
        "--data",
        str(tiny_data),
        "--out",
        str(run),
        *TINY,
        "--max-steps",
        "100000",
        "--eval-every",
        "1",
        "--save-every",
        "1",
        "--quiet",
        "--threads",
        "1",
    ]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
            assert process.poll() is None, process.stderr.read().decode()[-1000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        process.send_signal(signal.SIGKILL)  # mid-write of some checkpoint, most likely
        process.wait()
    load_run(run)
    assert main(["train", "--resume", str(run), "--max-steps", "8", "--quiet"]) in (0,)
    assert load_run(run).metrics()[-1]["step"] >= 3


KILL_RUN = [*TINY, "--max-steps", "12", "--eval-every", "3", "--save-every", "1", "--quiet", "--threads", "1"]
KILL_POINTS = 3  # random moments per test run; docs/reliability.md has the counts of the last run


@pytest.mark.slow
def test_cli_train_killed_at_random_moments_resumes_to_bit_identical_weights(tiny_data, tmp_path):
    """fp32 CPU: SIGKILL at random moments (mid-step, mid-checkpoint, between state.pt and the weights),
    then --resume, gives the same model.safetensors, tensor for tensor, as a run never interrupted."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    reference = tmp_path / "reference"
    assert main(["train", "--data", str(tiny_data), "--out", str(reference), *KILL_RUN]) == 0
    expected = load_file(reference / "model.safetensors")
    rng = random.Random(1234)
    for point in range(KILL_POINTS):
        run = tmp_path / f"killed{point}"
        argv = [sys.executable, "-m", "aigc", "train", "--data", str(tiny_data), "--out", str(run), *KILL_RUN]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            deadline = time.monotonic() + 120
            while not (run / "state.pt").exists() and process.poll() is None:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.15))  # the tiny run checkpoints every few milliseconds
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait()
        assert process.returncode in (0, -signal.SIGKILL), process.stderr.read().decode()[-1000:]
        assert main(["train", "--resume", str(run), "--max-steps", "12", "--quiet", "--threads", "1"]) == 0
        got = load_file(run / "model.safetensors")
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[name], expected[name]) for name in expected), f"kill point {point} diverged"
