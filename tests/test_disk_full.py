"""A write the file system refuses (disk full, file size limit) during train, prepare, export and import:
one line naming the reason, exit 2, no traceback, the previous artefacts byte for byte as they were and
no temp file left behind.

Two ways to make a write fail, neither needing root:
- /dev/full: every write to it fails with ENOSPC from the kernel. A temp file of `fsutil.atomic_path`
  replaced by a link to it sends Python's and torch's writes into a real "No space left on device".
  (safetensors writes a file of its own and renames it over the link, so it is not reached this way.)
- RLIMIT_FSIZE in a subprocess: the kernel refuses any write past the limit with EFBIG ("File too
  large"), in every writer (safetensors' Rust, torch, numpy, Python). It is not ENOSPC, but it fails the
  same call at the same point (a write cut off midway), so it tests the same recovery end to end.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from aigc import fsutil
from aigc.cli import main
from tests.conftest import make_reviews, write_csv
from tests.train.conftest import write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "2"]
PREPARE = ["--vocab-size", "300", "--no-dedup"]


def snapshot(folder: Path) -> dict[str, bytes]:
    """The bytes of what must survive a refused write: every file, but for a run being resumed its
    checkpoint (config.json takes the resumed budget and metrics.jsonl may gain an evaluation at once;
    both are rewritten from the checkpoint by the next --resume)."""
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    if (folder / "state.pt").is_file():
        files = {name: data for name, data in files.items() if name not in ("config.json", "metrics.jsonl")}
    return files


def temp_debris(folder: Path) -> list[str]:
    """Temp files or folders that aigc (or safetensors under it) left anywhere below `folder`."""
    names = [p.name for p in folder.rglob("*")]
    return [n for n in names if n.startswith(".tmp") or ".tmp-" in n or n.endswith(".tmp")]


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory, tiny_tokenizer, reviews) -> Path:
    """A trained run, its dataset, a CSV source with a dataset prepared from it, an export and an import."""
    base = tmp_path_factory.mktemp("full")
    data = write_dataset(base / "data", tiny_tokenizer, reviews)
    argv = ["train", "--data", str(data), "--out", str(base / "run"), *TINY, "--max-steps", "2", "--eval-every", "2"]
    assert main([*argv, "--quiet", "--threads", "1"]) == 0
    write_csv(base / "reviews.csv", make_reviews(300, seed=1))
    assert main(["prepare", str(base / "reviews.csv"), "--out", str(base / "prepared"), *PREPARE]) == 0
    assert main(["export", str(base / "run"), "--format", "hf", "--out", str(base / "hf")]) == 0
    assert main(["import", str(base / "hf"), "--out", str(base / "imported")]) == 0
    return base


@pytest.fixture
def copy(artefacts, tmp_path) -> Path:
    for name in ("data", "run", "prepared", "hf", "imported"):
        shutil.copytree(artefacts / name, tmp_path / name)
    shutil.copy(artefacts / "reviews.csv", tmp_path / "reviews.csv")
    return tmp_path


def commands(base: Path) -> dict[str, list[str]]:
    b = str(base)
    return {
        "train": ["train", "--resume", f"{b}/run", "--data", f"{b}/data", "--max-steps", "4", "--quiet"],
        "prepare": ["prepare", f"{b}/reviews.csv", "--out", f"{b}/prepared", *PREPARE, "--overwrite", "--seed", "7"],
        "export": ["export", f"{b}/run", "--format", "hf", "--out", f"{b}/hf", "--overwrite"],
        "import": ["import", f"{b}/hf", "--out", f"{b}/imported", "--overwrite"],
    }


# What each command would replace; a refused write must leave it exactly as it was.
TARGET = {"train": "run", "prepare": "prepared", "export": "hf", "import": "imported"}


def assert_one_line(code: int, err: str, reason: str) -> str:
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1, err[-3000:]
    assert reason in lines[0], lines[0]
    return lines[0]


# -------------------------------------------------------------------------------------------------
# ENOSPC from the kernel: /dev/full
# -------------------------------------------------------------------------------------------------


@pytest.fixture
def dev_full(monkeypatch):
    """Every atomic write goes to /dev/full (the temp file becomes a link to it)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    real = fsutil._new_temp_file

    def full_temp_file(path: Path) -> Path:
        tmp = real(path)
        tmp.unlink()
        tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(fsutil, "_new_temp_file", full_temp_file)


@pytest.mark.parametrize("command", sorted(TARGET))
def test_disk_full_is_one_line_and_leaves_the_previous_artefacts(copy, dev_full, capsys, command):
    before = snapshot(copy / TARGET[command])
    capsys.readouterr()
    code = main(commands(copy)[command])
    assert_one_line(code, capsys.readouterr().err, "No space left on device; free some space and run again")
    assert snapshot(copy / TARGET[command]) == before
    assert temp_debris(copy) == []


def test_a_training_state_that_cannot_be_written_names_the_cause(tmp_path, dev_full):
    """torch.save reported a full disk as "enforce fail at inline_container.cc"; now it is ENOSPC."""
    import torch

    from aigc.artifacts.state import save_state
    from aigc.errors import AigcError

    (tmp_path / "state.pt").write_bytes(b"previous")
    with pytest.raises(AigcError, match=r"state\.pt: No space left on device"):
        save_state(tmp_path, {"step": 1, "weights": torch.zeros(1000)})
    assert (tmp_path / "state.pt").read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_safetensors_reporting_a_full_disk_is_one_line(copy, monkeypatch, capsys):
    """safetensors replaces a /dev/full link with its own file, so its error is injected: a partial
    file, then the message safetensors 0.8 gives for an OS error (its wording for EFBIG, with 28)."""
    from safetensors import SafetensorError

    import aigc.artifacts.run as run_module

    def save_model(model, filename):
        Path(filename).write_bytes(b"\0" * 100)
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(run_module, "save_model", save_model)
    before = snapshot(copy / "imported")
    code = main(commands(copy)["import"])
    assert_one_line(code, capsys.readouterr().err, "model.safetensors: No space left on device")
    assert snapshot(copy / "imported") == before
    assert temp_debris(copy) == []


def test_a_refused_write_outside_atomic_writes_is_one_line(copy, monkeypatch, capsys):
    """Shards are written straight into prepare's temp folder: an ENOSPC there reaches the CLI as an
    OSError, which it reports in one line; the temp folder is removed."""
    import aigc.artifacts.dataset as dataset

    def write_split(folder, split, *args, **kwargs):
        raise OSError(28, "No space left on device", str(Path(folder) / f"{split}.bin"))

    monkeypatch.setattr(dataset, "write_split", write_split)
    monkeypatch.setattr("aigc.data.prepare.write_split", write_split, raising=False)
    before = snapshot(copy / "prepared")
    code = main(commands(copy)["prepare"])
    assert_one_line(code, capsys.readouterr().err, "No space left on device")
    assert snapshot(copy / "prepared") == before
    assert temp_debris(copy) == []


# -------------------------------------------------------------------------------------------------
# EFBIG from the kernel: a file size limit, in a subprocess
# -------------------------------------------------------------------------------------------------

# Runs each command under RLIMIT_FSIZE (SIGXFSZ ignored, so the write fails with EFBIG instead of
# killing the process) and prints exit code and stderr as JSON.
LIMITED = """
import contextlib, io, json, resource, signal, sys, traceback
from aigc.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
results = []
for limit, argv in json.loads(sys.argv[1]):
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except BaseException:
            code, _ = 1, traceback.print_exc()
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    results.append((code, err.getvalue()))
print(json.dumps(results))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ as on Linux")
def test_a_file_size_limit_is_one_line_in_every_writer(copy):
    sizes = {name: max(p.stat().st_size for p in (copy / TARGET[name]).rglob("*") if p.is_file()) for name in TARGET}
    # Below the largest file each command writes (model weights; the train shard), above most others.
    limits = {name: size // 2 for name, size in sizes.items()}
    jobs = [(limits[name], argv) for name, argv in commands(copy).items()]
    before = {name: snapshot(copy / TARGET[name]) for name in TARGET}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(fsutil.__file__).parents[1]), os.getcwd()])}
    done = subprocess.run(
        [sys.executable, "-c", LIMITED, json.dumps(jobs)], capture_output=True, text=True, env=env, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = dict(zip(commands(copy), json.loads(done.stdout.splitlines()[-1])))
    for name, (code, err) in results.items():
        assert_one_line(code, err, "File too large; raise the file size limit (ulimit -f) and run again")
        assert snapshot(copy / TARGET[name]) == before[name], name
    assert temp_debris(copy) == []
