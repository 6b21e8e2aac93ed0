import json

import pytest

from aigc.cli import main
from aigc.errors import AigcError
from aigc.plots import plot_runs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _fake_run(folder, scale=1.0):
    folder.mkdir(parents=True)
    lines = []
    for i, step in enumerate((10, 20, 30, 40)):
        loss = scale * (6.0 - i)
        lines.append(
            json.dumps(
                {
                    "step": step,
                    "tokens": step * 512,
                    "train_loss": loss + 0.1,
                    "val_loss": loss,
                    "train_acc": 0.1 * i,
                    "val_acc": 0.09 * i,
                }
            )
        )
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_plot_runs_writes_loss_and_accuracy_pngs(tmp_path):
    run = _fake_run(tmp_path / "run")
    paths = plot_runs([run])
    assert paths == [run / "plots" / "loss.png", run / "plots" / "accuracy.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 20_000  # a real figure, not an empty canvas


def test_plot_runs_overlays_several_runs_into_out(tmp_path):
    a, b = _fake_run(tmp_path / "a"), _fake_run(tmp_path / "b", scale=0.8)
    single = plot_runs([a], tmp_path / "single")[0].stat().st_size
    paths = plot_runs([a, b], tmp_path / "both")
    assert all(p.parent == tmp_path / "both" for p in paths)
    assert paths[0].stat().st_size > single  # two runs draw more curves and legend entries
    assert not (a / "plots").exists()


def test_plot_runs_needs_metrics(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(AigcError, match="no metrics yet"):
        plot_runs([tmp_path / "empty"])
    with pytest.raises(AigcError, match="run folder not found"):
        plot_runs([tmp_path / "missing"])


def test_cli_plot_prints_paths_and_reports_errors(tmp_path, capsys):
    run = _fake_run(tmp_path / "run")
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "plots" / "loss.png"), str(run / "plots" / "accuracy.png")]
    assert main(["plot", str(run), str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("aigc plot: error: run folder not found")
