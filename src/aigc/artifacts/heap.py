"""Keep freed memory in the process while training or scoring on the CPU, so large temporaries
reuse pages instead of faulting fresh ones in every step or batch.

Why: glibc serves every allocation over its threshold (at most 32 MB) with a fresh `mmap` and hands it
back with `munmap` when freed, so a loop that allocates the same large tensors each time faults every
page of them in again and has the kernel zero it. Measured on a 2-core AVX2 EPYC (2026-12-04,
docs/benchmarks.md): scoring 24 documents with SmolLM2-135M (`evaluate.lm`, logits of up to 0.8 GB a
batch) took 21.3-23.7 s with freed memory kept against 23.8-26.8 s without; before the fused loss
stopped zero-filling its weight gradient, one such fill of 113 MB took 250 ms against 14 ms in reused
memory. aigc's own training step no longer allocates much that is this large (its LoRA and full
fine-tuning steps ran at the same speed either way), but peft and transformers ran 1.2x faster with it.

How: while held, `mallopt` turns off glibc's `mmap` for large blocks and its trimming of the heap's
top, so freed blocks stay in the heap for the next use; the resident peak stays what the largest step
needs. `release` restores glibc's defaults and gives the free memory back (`malloc_trim`). Elsewhere
than glibc, or with `AIGC_KEEP_FREED_MEMORY=0`, nothing changes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import threading
from collections.abc import Iterator

# mallopt's parameters (glibc's malloc.h) and their defaults.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536
NEVER_TRIM = 2**31 - 1  # mallopt takes an int

_lock = threading.Lock()
_holders = 0


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has `mallopt` and `malloc_trim`), else None."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    if not (hasattr(library, "mallopt") and hasattr(library, "malloc_trim")):
        return None
    return library


def enabled() -> bool:
    """Whether `hold` changes anything here: glibc, and not turned off by AIGC_KEEP_FREED_MEMORY=0."""
    return os.environ.get("AIGC_KEEP_FREED_MEMORY", "1") != "0" and _glibc() is not None


def hold() -> bool:
    """Keep freed memory in the process until the matching `release`; nested holds count.
    Returns whether the allocator's policy is (now) changed."""
    global _holders
    if not enabled():
        return False
    library = _glibc()
    with _lock:
        if _holders == 0:
            # Each call returns 1 on success; a refusal leaves glibc's own policy, which is correct too.
            library.mallopt(M_MMAP_MAX, 0)
            library.mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
        _holders += 1
    return True


def release() -> None:
    """End one `hold`; the last one restores glibc's defaults and returns the free memory to the system."""
    global _holders
    library = _glibc()
    with _lock:
        if _holders == 0 or library is None:
            return
        _holders -= 1
        if _holders == 0:
            library.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            library.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            library.malloc_trim(0)


def holders() -> int:
    """How many holds are open."""
    return _holders


@contextlib.contextmanager
def kept(active: bool = True) -> Iterator[bool]:
    """`hold` for the block (when `active`), then `release`; yields whether freed memory is kept."""
    held = active and hold()
    try:
        yield held
    finally:
        if held:
            release()
