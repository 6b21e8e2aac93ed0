"""Atomic writes: durable against a power loss (the file fsync'ed before the rename, its folder after),
permissions of any new file, and no change to the process-wide umask (a threaded server shares it)."""

from __future__ import annotations

import os
import stat

import pytest

from aigc import fsutil


def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("fsync", "dir" if os.path.isdir(target) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(fsutil.os, "fsync", fsync)
    monkeypatch.setattr(fsutil.os, "replace", replace)
    fsutil.write_text(tmp_path / "a.txt", "hello")
    assert events == [("fsync", "file"), ("replace", "a.txt"), ("fsync", "dir")]
    assert (tmp_path / "a.txt").read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]  # no temp file left behind


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_write_gives_new_file_permissions_without_touching_the_umask(tmp_path, monkeypatch, mask):
    real_umask = os.umask
    old = real_umask(mask)  # the test sets it; the code under test must only see its effect
    calls = []
    try:
        with monkeypatch.context() as patch:
            patch.setattr(fsutil.os, "umask", lambda m: calls.append(m) or mask)
            fsutil.write_json(tmp_path / "c.json", {"a": 1})
            fsutil.write_with(tmp_path / "d.bin", lambda tmp: tmp.write_bytes(b"x"))
    finally:
        real_umask(old)
    assert calls == []
    for name in ("c.json", "d.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~mask


def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    (tmp_path / "e.txt").write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        fsutil.write_with(tmp_path / "e.txt", broken)
    assert (tmp_path / "e.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["e.txt"]
