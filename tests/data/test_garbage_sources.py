"""Any bytes given to `aigc prepare` as a CSV, TSV, JSONL, TXT or Parquet file give a dataset or one
line naming the file (exit 2), never a traceback."""

from __future__ import annotations

import random

import pytest
from tests.conftest import make_reviews, write_csv

from aigc.cli import main

KINDS = ("csv", "tsv", "jsonl", "txt", "parquet")


def _garbage(kind: str, seed: int) -> bytes:
    rng = random.Random(f"{kind}/{seed}")
    if seed % 3 == 0:
        return rng.randbytes(rng.randint(1, 20000))  # not text at all
    if seed % 3 == 1:  # text with a few random bytes and control characters spliced in
        text = bytearray("text,label\n" + "\n".join(f"{t},{label}" for t, label in make_reviews(60, seed)), "utf-8")
        for _ in range(rng.randint(1, 40)):
            text[rng.randrange(len(text))] = rng.choice(b'\r\x00\xff\xc3"\t,{}')
        return bytes(text)
    return rng.choice([b"\xff\xfe" + "text\nhello\n".encode("utf-16-le"), b"\r" * 50, b'"' * 3 + b"\r\n" * 5])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(6))
def test_prepare_of_any_bytes_is_a_dataset_or_one_line_naming_the_file(tmp_path, capsys, kind, seed):
    source = tmp_path / f"input.{kind}"
    source.write_bytes(_garbage(kind, seed))
    code = main(["prepare", str(source), "--out", str(tmp_path / "data"), "--vocab-size", "300"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code != 0:
        lines = [line for line in err.splitlines() if "error:" in line]
        assert code == 2 and len(lines) == 1, err
        assert "input." in lines[0] or "documents remain" in lines[0], lines[0]  # the file, or too little text


def test_prepare_of_a_binary_csv_says_it_is_not_text(tmp_path, capsys, reviews):
    good = write_csv(tmp_path / "good.csv", reviews[:50])
    source = tmp_path / "binary.csv"
    source.write_bytes(random.Random(0).randbytes(4000) + open(good, "rb").read())
    assert main(["prepare", str(source), "--out", str(tmp_path / "data")]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "binary.csv is not UTF-8 text" in line
