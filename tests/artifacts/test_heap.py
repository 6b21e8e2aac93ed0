import os
from pathlib import Path

import numpy as np
import pytest

from aigc.artifacts import heap

BLOCK = 64 << 20  # over glibc's largest mmap threshold (32 MB): served by mmap under its own policy
STATM = Path("/proc/self/statm")


def resident_bytes() -> int:
    return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def kept_after_a_freed_block() -> int:
    """How much more memory the process holds after allocating, touching and freeing a BLOCK."""
    before = resident_bytes()
    block = np.empty(BLOCK, dtype=np.uint8)
    block.fill(1)
    del block
    return resident_bytes() - before


needs_glibc = pytest.mark.skipif(heap._glibc() is None or not STATM.is_file(), reason="glibc's mallopt, Linux")


@needs_glibc
def test_while_held_a_freed_block_stays_for_the_next_and_release_gives_it_back(monkeypatch):
    monkeypatch.delenv("AIGC_KEEP_FREED_MEMORY", raising=False)
    assert kept_after_a_freed_block() < BLOCK // 4  # glibc's own policy: unmapped when freed
    assert heap.hold()
    try:
        assert kept_after_a_freed_block() > BLOCK * 3 // 4  # kept in the heap...
        assert abs(kept_after_a_freed_block()) < BLOCK // 4  # ...and reused: the process grows no further
        held = resident_bytes()
    finally:
        heap.release()
    assert heap.holders() == 0
    assert resident_bytes() < held - BLOCK // 2  # released: trimmed back to the system
    assert kept_after_a_freed_block() < BLOCK // 4  # and glibc's policy again


@needs_glibc
def test_holds_nest_and_only_the_last_release_restores(monkeypatch):
    monkeypatch.delenv("AIGC_KEEP_FREED_MEMORY", raising=False)
    assert heap.hold() and heap.hold()
    heap.release()
    assert heap.holders() == 1
    kept_after_a_freed_block()
    assert abs(kept_after_a_freed_block()) < BLOCK // 4  # still held: the block is reused
    heap.release()
    heap.release()  # one too many: nothing to end, no error
    assert heap.holders() == 0
    assert kept_after_a_freed_block() < BLOCK // 4


def test_turned_off_it_changes_nothing(monkeypatch):
    monkeypatch.setenv("AIGC_KEEP_FREED_MEMORY", "0")
    assert not heap.enabled() and not heap.hold()
    assert heap.holders() == 0
