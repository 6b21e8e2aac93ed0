"""Fault injection: every file of a run and of a dataset, truncated, bit-flipped or replaced by random
bytes, then read by every command that reads it. Each must end in a one-line error (exit 2, no
traceback) or a correct result (exit 0); any other exception fails the test.

Counts of the last run are in docs/reliability.md ("Files and runs")."""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

import pytest

from aigc.cli import main
from aigc.errors import AigcError
from tests.train.conftest import write_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--preset", "tiny", "--block-size", "32", "--batch-size", "4", "--eval-batches", "2", "--warmup-steps", "2"]
MUTATIONS = ("truncate", "flip", "garbage")
SEEDS = (0,)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_tokenizer, reviews) -> tuple[Path, Path]:
    """A tiny trained run (2 evaluations, best and state written) and the dataset it was trained on."""
    base = tmp_path_factory.mktemp("fault")
    data = write_dataset(base / "data", tiny_tokenizer, reviews)
    run = base / "run"
    argv = ["train", "--data", str(data), "--out", str(run), *TINY, "--max-steps", "4", "--eval-every", "2"]
    assert main([*argv, "--quiet", "--threads", "1"]) == 0
    return run, data


def mutate(path: Path, how: str, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: rng.randrange(len(data))]
    elif how == "flip":
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(data) * 8)
            data[i // 8] ^= 1 << (i % 8)
    else:
        data = bytearray(rng.randbytes(max(len(data), 1)))
    path.write_bytes(bytes(data))


def _as_cli(name: str, call) -> int:
    """What `aigc.cli.main` does with a library call: an AigcError becomes one line and exit 2."""
    try:
        call()
    except AigcError as exc:
        print(f"aigc {name}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _serve_loader(run: Path, data: Path, tmp: Path) -> int:
    # Deferred: the serve stack is imported by this command only.
    from aigc.models import load_run
    from aigc.serve import create_app

    return _as_cli("serve", lambda: create_app(load_run(run)))


def _report(run: Path, data: Path, tmp: Path) -> int:
    # Deferred: the report module is imported by this command only.
    from aigc.report import write_report

    return _as_cli("report", lambda: write_report(run))


def _cli(*args: str):
    def command(run: Path, data: Path, tmp: Path) -> int:
        return main([a.format(run=run, data=data, tmp=tmp) for a in args])

    return command


EVAL = ("eval", "{run}", "--data", "{data}", "--lm-docs", "2", "--prompts", "2", "--samples", "1")
EVAL_FAST = (*EVAL, "--max-new-tokens", "4", "--classifier-docs", "20", "--out", "{tmp}/eval.json")
COMMANDS = {
    "generate": _cli("generate", "{run}", "--prompt", "a", "--max-new-tokens", "3", "--seed", "1"),
    "eval": _cli(*EVAL_FAST),
    "resume": _cli("train", "--resume", "{run}", "--data", "{data}", "--max-steps", "6", "--quiet"),
    "serve": _serve_loader,
    "export": _cli("export", "{run}", "--format", "hf", "--out", "{tmp}/hf"),
    "export-best": _cli("export", "{run}", "--best", "--format", "int8", "--out", "{tmp}/int8"),
    "plot": _cli("plot", "{run}"),
    "report": _report,
}
# Which commands read which file (run files under run/, dataset files under data/).
READERS = {
    "run/config.json": ("generate", "eval", "resume", "serve", "export", "report"),
    "run/tokenizer.json": ("generate", "eval", "resume", "serve", "export"),
    "run/model.safetensors": ("generate", "eval", "resume", "serve", "export"),
    "run/best.safetensors": ("export-best",),
    "run/state.pt": ("resume",),
    "run/metrics.jsonl": ("plot", "report", "resume"),
    "data/dataset.json": ("resume", "eval"),
    "data/tokenizer.json": ("resume", "eval"),
    "data/train.bin": ("resume",),
    "data/train.docs.npy": ("resume", "eval"),
    "data/val.bin": ("resume", "eval"),
    "data/val.docs.npy": ("resume", "eval"),
}
CASES = [
    (name, command, how, seed)
    for name, cmds in READERS.items()
    for command in cmds
    for how in MUTATIONS
    for seed in SEEDS
]


@pytest.mark.parametrize(("name", "command", "how", "seed"), CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_damaged_file_gives_a_one_line_error_or_a_correct_result(trained, tmp_path, capsys, name, command, how, seed):
    run, data = trained
    shutil.copytree(run, tmp_path / "run")
    shutil.copytree(data, tmp_path / "data")
    mutate(tmp_path / name, how, random.Random(f"{name}/{how}/{seed}"))
    capsys.readouterr()
    code = COMMANDS[command](tmp_path / "run", tmp_path / "data", tmp_path)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code != 0:
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1, err[-2000:]
        assert Path(name).name in lines[0], lines[0]  # the error names the damaged file
