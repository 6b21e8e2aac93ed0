import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import write_csv as _csv

from aigc.cli import main
from aigc.config import PrepareConfig


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error line on stderr"
    assert err[-1].startswith("aigc prepare: error: ")
    assert not any("Traceback" in line for line in err)
    return err[-1]


def test_prepare_cli_help_lists_every_option_with_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(PrepareConfig):
        assert "--" + f.name.replace("_", "-") in out
    assert "--text-field" in out and "--label-field" in out and "(default: 8192)" in out


def test_prepare_cli_prints_summary_and_writes_dataset(tmp_path, capsys, reviews):
    source = _csv(tmp_path / "r.csv", reviews)
    code = main(
        [
            "prepare",
            source,
            "--out",
            str(tmp_path / "ds"),
            "--label-column",
            "label",
            "--vocab-size",
            "400",
            "--test-fraction",
            "0.1",
            "--seed",
            "3",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    info = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert info["options"]["seed"] == 3 and set(info["splits"]) == {"train", "val", "test"}
    assert f"read      {len(reviews)} documents" in captured.out
    assert f"{info['counts']['dedup']['near']} near duplicates removed" in captured.out
    assert "labels    neg" in captured.out
    assert "training a 400-token BPE tokenizer" in captured.err  # progress goes to stderr


def test_prepare_cli_jsonl_field_aliases(tmp_path, capsys):
    lines = [json.dumps({"body": f"document {i} about film number {i * 7}", "y": i % 2}) for i in range(30)]
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    code = main(
        [
            "prepare",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "ds"),
            "--text-field",
            "body",
            "--label-field",
            "y",
            "--vocab-size",
            "300",
            "--no-dedup",
        ]
    )
    assert code == 0
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["labels"] == ["0", "1"]


def _bad_inputs(tmp_path, reviews):
    """(name, argv after `prepare`, expected part of the error line) for each bad input `prepare` refuses."""
    good = _csv(tmp_path / "good.csv", reviews)
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (tmp_path / "book.xlsx").write_bytes(b"x")
    one_label = _csv(tmp_path / "one.csv", [(f"review {i}", "pos") for i in range(5)])
    many_labels = _csv(tmp_path / "many.csv", [(f"review {i}", f"v{i}") for i in range(257)])
    empty = _csv(tmp_path / "empty.csv", [("<br/>", "pos"), ("  ", "neg")])
    existing = tmp_path / "existing"
    assert main(["prepare", good, "--out", str(existing), "--vocab-size", "300", "--no-dedup"]) == 0
    return [
        ("missing path", [str(tmp_path / "nope.csv")], "source not found"),
        ("unsupported extension", [str(tmp_path / "book.xlsx")], "unsupported file type '.xlsx'"),
        ("missing column", [good, "--text-column", "body"], "no column 'body'; columns there: 'text', 'label'"),
        ("malformed json", [str(tmp_path / "bad.jsonl")], "malformed JSON on line 2"),
        ("empty corpus", [empty], "the corpus is empty after cleaning"),
        ("single label", [one_label, "--label-column", "label"], "has a single value"),
        ("too many labels", [many_labels, "--label-column", "label"], "more than 256 distinct values"),
        ("vocab too small", [good, "--vocab-size", "100"], "--vocab-size 100 is too small"),
        (
            "different dataset",
            [good, "--out", str(existing), "--vocab-size", "301"],
            "already holds a different dataset",
        ),
    ]


def test_prepare_cli_bad_inputs_give_one_line_and_exit_2(tmp_path, capsys, reviews):
    cases = _bad_inputs(tmp_path, reviews)
    capsys.readouterr()
    for name, argv, expected in cases:
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / f"out-{name.replace(' ', '-')}")]
        assert main(["prepare", *argv]) == 2, name
        line = _error_line(capsys)
        assert expected in line, (name, line)
        assert ";" in line, f"{name}: the message should name the fix after a semicolon"
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir()), "a temp folder was left behind"


def test_prepare_cli_skip_bad_lines_continues(tmp_path, capsys):
    lines = [json.dumps({"text": f"document {i} about a film"}) for i in range(20)]
    lines.insert(5, "{broken")
    (tmp_path / "d.jsonl").write_text("\n".join(lines))
    code = main(
        [
            "prepare",
            str(tmp_path / "d.jsonl"),
            "--out",
            str(tmp_path / "ds"),
            "--skip-bad-lines",
            "--vocab-size",
            "300",
            "--no-dedup",
        ]
    )
    assert code == 0
    assert "1 bad lines skipped" in capsys.readouterr().out


def test_prepare_console_script_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "aigc", "prepare", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "ds")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"aigc prepare: error: source not found: {tmp_path / 'missing.txt'}; give a file (.txt .csv .tsv .jsonl "
        ".parquet), a folder of .txt files, or one of: imdb, rotten-tomatoes"
    ]


def test_prepare_cli_out_dot_fills_the_empty_working_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "work").mkdir()
    (tmp_path / "c.txt").write_text("\n\n".join(f"paragraph {i} about a film" for i in range(20)))
    monkeypatch.chdir(tmp_path / "work")
    assert main(["prepare", str(tmp_path / "c.txt"), "--out", ".", "--vocab-size", "300", "--no-dedup"]) == 0
    assert "dedup     off" in capsys.readouterr().out
    assert (tmp_path / "work" / "dataset.json").is_file()
    assert Path.cwd().samefile(tmp_path / "work")  # the folder itself was kept, not replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.txt", "work"]
