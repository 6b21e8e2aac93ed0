"""Memory of `aigc prepare` is bounded by a small multiple of the largest document: one long line is
cleaned, hashed for de-duplication, trained on and encoded in slices (figures in docs/reliability.md)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import aigc

SIZE = 4_000_000  # characters of the single document
MAX_GROWTH = 40  # peak RSS growth during prepare, in multiples of the document (was ~190x)

CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from aigc.config import PrepareConfig
    from aigc.data.prepare import prepare_dataset
    import datasketch, tokenizers  # imported before the baseline: their code is not the document's memory

    def status(key):  # KiB; VmHWM is this process's peak (ru_maxrss would include the parent's, from fork)
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key))

    before = status("VmRSS:")
    config = PrepareConfig(max_chars=60_000_000, val_fraction=0.0, test_fraction=0.0, vocab_size=400)
    prepare_dataset(sys.argv[1], Path(sys.argv[2]), config)
    print(status("VmHWM:") - before)
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/status: Linux only")
def test_prepare_of_one_huge_line_stays_within_a_small_multiple_of_it(tmp_path):
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "été", "猫", "dog", "ran"]
    text = " ".join(f"{rng.choice(words)}{rng.randint(0, 999)}" for _ in range(SIZE // 5))[:SIZE]
    source = tmp_path / "one-line.txt"
    source.write_text(text + "\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(aigc.__file__).parents[1])}  # the code under test, wherever it is
    argv = [sys.executable, "-c", CHILD, str(source), str(tmp_path / "data")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.split()[-1]) * 1024
    print(f"peak RSS growth {growth / 1e6:.0f} MB for {source.stat().st_size / 1e6:.1f} MB")
    assert growth < MAX_GROWTH * source.stat().st_size, f"{growth / 1e6:.0f} MB for a {SIZE / 1e6:.0f} MB document"
