"""Files a user names with --out are replaced only with --overwrite (`aigc eval`, `aigc plot`)."""

from __future__ import annotations

import json

from aigc.cli import main


def _metrics(run) -> None:
    rows = [
        {"step": s, "tokens": 128 * s, "train_loss": 5.0 / s, "val_loss": 5.5 / s, "train_acc": 0.1, "val_acc": 0.1}
        for s in (1, 2)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_eval_out_that_exists_needs_overwrite(make_run, tmp_path, capsys):
    run = make_run()
    out = tmp_path / "existing.json"
    out.write_text('{"mine": true}')
    assert main(["eval", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0] and str(out) in err[0]
    assert out.read_text() == '{"mine": true}'


def test_plot_out_that_holds_figures_needs_overwrite(make_run, tmp_path, capsys):
    run = make_run()
    _metrics(run)
    out = tmp_path / "figures"
    out.mkdir()
    (out / "loss.png").write_bytes(b"my own figure")
    assert main(["plot", str(run), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "loss.png" in err[0] and "--overwrite" in err[0]
    assert (out / "loss.png").read_bytes() == b"my own figure"
    assert main(["plot", str(run), "--out", str(out), "--overwrite"]) == 0
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    assert main(["plot", str(run)]) == 0  # the run's own plots/ folder is refreshed freely
    assert main(["plot", str(run)]) == 0
