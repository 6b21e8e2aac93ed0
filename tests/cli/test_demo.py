"""`aigc demo` end to end at toy scale: a small CSV instead of IMDb, the tiny preset, seconds of training."""

import json

import pytest
from tests.conftest import make_reviews, write_csv

from aigc.cli import main


@pytest.fixture
def review_csv(tmp_path):
    return write_csv(tmp_path / "reviews.csv", make_reviews(300, seed=1))


@pytest.mark.slow
def test_demo_runs_whole_pipeline_then_reuses_results(tmp_path, review_csv, capsys):
    data, run = tmp_path / "data", tmp_path / "run"
    argv = [
        "demo",
        "--source",
        str(review_csv),
        "--data",
        str(data),
        "--out",
        str(run),
        "--preset",
        "tiny",
        "--minutes",
        "0.05",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    for path in ("report.md", "report.html", "plots/loss.png", "eval/metrics.json", "samples.json"):
        assert (run / path).is_file(), path
    samples = json.loads((run / "samples.json").read_text(encoding="utf-8"))
    assert sorted(s["label"] for s in samples) == [""] + ["neg"] * 3 + ["pos"] * 3
    assert "This is an example of artificial intelligence" in samples[-1]["prompt"]
    report = (run / "report.md").read_text(encoding="utf-8")
    assert "Demo samples" in report and "continuation" in report
    assert "report:" in err.splitlines()[-3] and "aigc generate" in err

    weights_before = (run / "model.safetensors").read_bytes()
    assert main(argv + ["--no-eval"]) == 0
    err = capsys.readouterr().err
    assert "reusing" in err and "continuing it if unfinished" in err
    assert (run / "model.safetensors").read_bytes() == weights_before


def test_demo_rejects_non_positive_minutes(capsys):
    assert main(["demo", "--minutes", "0"]) == 2
    assert "--minutes must be > 0" in capsys.readouterr().err
