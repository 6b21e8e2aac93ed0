"""SIGTERM during a write (import, export, prepare, train) unwinds through `finally`: temp files and
folders are removed, the artefact being replaced is left as it was, and the CLI exits 143 with one
line. What a `kill -9` leaves (nothing can run then) the next --resume / --overwrite / import into the
same folder removes, by aigc's own naming patterns only.

The signal is real (os.kill of this process) and sent from inside the write path at a fixed point, so
the tests do not depend on timing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from aigc import fsutil
from aigc.cli import main
from tests.test_disk_full import PREPARE, TARGET, artefacts, commands, copy, snapshot, temp_debris  # noqa: F401

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals"),
]


def sigterm_after(monkeypatch, target: str):
    """Replace the function at `target` by one that calls it and then receives SIGTERM, mid-command."""
    module_name, name = target.rsplit(".", 1)
    module = __import__(module_name, fromlist=[name])
    real = getattr(module, name)

    def then_sigterm(*args, **kwargs):
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result

    monkeypatch.setattr(module, name, then_sigterm)


# Where each command gets its SIGTERM: while its largest file is half written (the temp file exists).
WRITERS = {
    "import": "aigc.artifacts.run.save_model",
    "export": "aigc.interop.hf.save_file",
    "prepare": "aigc.data.prepare.write_split",
    "train": "torch.save",
}


@pytest.mark.parametrize("command", sorted(WRITERS))
def test_sigterm_removes_temp_files_and_keeps_the_previous_artefact(copy, monkeypatch, capsys, command):  # noqa: F811
    before = snapshot(copy / TARGET[command])
    sigterm_after(monkeypatch, WRITERS[command])
    capsys.readouterr()
    code = main(commands(copy)[command])
    err = capsys.readouterr().err
    assert code == 128 + signal.SIGTERM and "Traceback" not in err
    assert f"aigc {commands(copy)[command][0]}: terminated" in err.splitlines()[-1]
    assert snapshot(copy / TARGET[command]) == before
    assert temp_debris(copy) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the CLI put the usual handler back


def test_sigterm_inside_uninterrupted_steps_waits_for_their_end():
    done = []
    with pytest.raises(fsutil.Terminated), fsutil.sigterm_raises():
        with fsutil.uninterrupted():
            os.kill(os.getpid(), signal.SIGTERM)
            done.append("after the signal")  # still runs: the swap is not split
        done.append("after the block")  # never runs
    assert done == ["after the signal"]


# -------------------------------------------------------------------------------------------------
# What a kill -9 leaves behind
# -------------------------------------------------------------------------------------------------

DEBRIS = (".model.safetensors.0123456789ab.tmp", ".tmpAb3dE9", ".config.json.a1b2c3d4e5f6.tmp")
KEPT = ("notes.txt", ".tmp-mine", ".tmpfile.bak")  # a user's files that only look alike


def plant(folder: Path) -> None:
    for name in DEBRIS + KEPT:
        (folder / name).write_bytes(b"x" * 100)


@pytest.mark.parametrize("command", ["import", "export", "train"])
def test_the_next_run_into_a_folder_removes_stale_temp_files(copy, command):  # noqa: F811
    plant(copy / TARGET[command])
    assert main(commands(copy)[command]) == 0
    left = {p.name for p in (copy / TARGET[command]).iterdir()}
    assert not left & set(DEBRIS) and set(KEPT) <= left


def test_import_into_a_folder_holding_only_temp_files_needs_no_overwrite(copy):  # noqa: F811
    out = copy / "new-run"
    out.mkdir()
    (out / DEBRIS[0]).write_bytes(b"half of a model")
    assert main(["import", str(copy / "hf"), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file() and not (out / DEBRIS[0]).exists()


def test_prepare_removes_the_temp_folders_a_killed_prepare_left(copy):  # noqa: F811
    stale = copy / ".prepared.tmp-ab12cd34"
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 100)
    other = copy / ".data.tmp-ab12cd34"  # another dataset's: not this prepare's to remove
    other.mkdir()
    assert main(["prepare", str(copy / "reviews.csv"), "--out", str(copy / "prepared"), *PREPARE, "--overwrite"]) == 0
    assert not stale.exists() and other.is_dir()
