"""The run folder under `--overwrite` and `--resume`: nothing deleted or written through a symbolic link,
nothing touched before every check passed, only aigc's own files deleted; a damaged weights file is
repaired from state.pt on resume, and the CLI says so."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file
from tests.train.test_cli_train import TINY

from aigc.cli import main

RUN_FILES = ("config.json", "tokenizer.json", "model.safetensors", "best.safetensors", "state.pt", "metrics.jsonl")


@pytest.fixture
def run(tiny_data, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--data", str(tiny_data), "--out", str(run), *TINY, "--max-steps", "2", "--eval-every", "2"]
    assert main([*argv, "--quiet", "--threads", "1"]) == 0
    return run


def _overwrite(tiny_data, run) -> int:
    argv = ["train", "--data", str(tiny_data), "--out", str(run), *TINY, "--max-steps", "2", "--eval-every", "2"]
    return main([*argv, "--overwrite", "--quiet", "--threads", "1"])


def _snapshot(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("link", ["plots", "eval", "metrics.jsonl", "plots/loss.png"])
def test_overwrite_refuses_a_symlink_and_changes_nothing(tiny_data, run, tmp_path, capsys, link):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (outside / "loss.png").write_text("not ours")
    target = outside if "." not in link else outside / ("loss.png" if link.endswith(".png") else "precious.txt")
    if (run / link).is_dir():
        for child in (run / link).iterdir():
            child.unlink()
        (run / link).rmdir()
    elif (run / link).exists():
        (run / link).unlink()
    (run / link).symlink_to(target)
    before_run, before_outside = _snapshot(run), _snapshot(outside)
    capsys.readouterr()
    assert _overwrite(tiny_data, run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "symbolic link" in err[0] and link.split("/")[-1] in err[0], err
    assert _snapshot(run) == before_run  # checked before touching anything: every file still there
    assert _snapshot(outside) == before_outside
    assert all((run / name).is_file() for name in RUN_FILES if name != link)


def test_overwrite_deletes_only_files_aigc_wrote(tiny_data, run):
    (run / "plots" / "my-notes.txt").write_text("mine")
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "hand-made.json").write_text("{}")
    (run / "README.txt").write_text("about this run")
    old_weights = (run / "model.safetensors").read_bytes()
    assert _overwrite(tiny_data, run) == 0
    assert (run / "plots" / "my-notes.txt").read_text() == "mine"
    assert (run / "eval" / "hand-made.json").read_text() == "{}"
    assert (run / "README.txt").read_text() == "about this run"
    assert (run / "plots" / "loss.png").is_file() and (run / "model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # the new run's, not appended
    assert old_weights == (run / "model.safetensors").read_bytes()  # same seed, same data: same weights


def test_resume_never_appends_through_a_symlinked_metrics_file(tiny_data, run, tmp_path, capsys):
    outside = tmp_path / "elsewhere.jsonl"
    outside.write_text((run / "metrics.jsonl").read_text())
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    before = outside.read_bytes()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "metrics.jsonl is a symbolic link" in err[0], err
    assert outside.read_bytes() == before


def test_append_jsonl_refuses_a_symlink_even_when_it_appears_later(tmp_path):
    from aigc.errors import AigcError
    from aigc.fsutil import append_jsonl

    outside = tmp_path / "outside.jsonl"
    outside.write_text("")
    (tmp_path / "log.jsonl").symlink_to(outside)
    with pytest.raises(AigcError, match="symbolic link"):
        append_jsonl(tmp_path / "log.jsonl", {"step": 1})
    assert outside.read_text() == ""


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing"])
def test_resume_repairs_a_damaged_weights_file_from_state_and_says_so(run, capsys, damage):
    path = run / "model.safetensors"
    good = {name: tensor.clone() for name, tensor in load_file(path).items()}  # load_file maps the file
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0x40  # inside the last tensor's bytes: the header still parses
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        path.unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 0  # budget reached: no step taken
    err = capsys.readouterr().err
    assert "note: " in err and "model.safetensors" in err and "rewritten from state.pt" in err, err
    repaired = load_file(path)
    assert repaired.keys() == good.keys() and all((repaired[k] == good[k]).all() for k in good)


def test_resume_of_an_intact_run_says_nothing_about_weights(run, capsys):
    mtime = os.stat(run / "model.safetensors").st_mtime_ns
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "2"]) == 0
    assert "rewritten" not in capsys.readouterr().err
    assert os.stat(run / "model.safetensors").st_mtime_ns >= mtime
