"""Atomic file writes: write to a temp file in the same folder, then rename over the target.

A crash or `kill -9` at any moment leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aigc.errors import AigcError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed.

    The file is fsync'ed before the rename and its folder after it, so a power loss too leaves the old
    file or the new one. The temp file is created with mode 0o666 for the kernel to apply the umask:
    the result has the permissions of any new file, and the process-wide umask is never touched
    (reading it means setting it, which races with other threads)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_file(path)
    mode = tmp.stat().st_mode & 0o777  # what the umask allows a new file
    try:
        yield tmp
        if tmp.stat().st_mode & 0o777 != mode:  # a writer that replaced the file (safetensors does) made it 0600
            os.chmod(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _new_temp_file(path: Path) -> Path:
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise AigcError(f"cannot create a temporary file beside {path}; remove the stale .{path.name}.*.tmp files")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDWR if os.name == "nt" else os.O_RDONLY)  # Windows syncs writable handles only
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable. Windows cannot open a folder for this; some file systems
    (network, FUSE) refuse it with EINVAL: the rename is then as durable as they make it."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def file_digest(path: str | os.PathLike) -> str:
    """BLAKE2b of a file's bytes, read in chunks (bounded memory for large weights)."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call `writer(tmp_path)` and atomically move the result to `path`."""
    with atomic_path(path) as tmp:
        writer(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line and flush it to disk (metrics logs grow line by line). A symbolic link at
    `path` is refused, never followed: the log must not grow a file outside its folder."""
    path = Path(path)
    try:
        # O_NOFOLLOW: the check and the open are one step (no window for a link to appear in between).
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666)
    except OSError as exc:
        if path.is_symlink():
            raise AigcError(f"{path} is a symbolic link; aigc appends only to its own files, remove the link") from None
        raise AigcError(f"cannot append to {path} ({exc.strerror})") from exc
    if _NOFOLLOW == 0 and path.is_symlink():  # no O_NOFOLLOW (Windows): check after the open instead
        os.close(fd)
        raise AigcError(f"{path} is a symbolic link; aigc appends only to its own files, remove the link")
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def parse_jsonl_objects(text: str, source: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line of user-supplied JSONL; a line that is not a
    JSON object is an AigcError naming the file and line."""
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise AigcError(f"{source} line {number} is not valid JSON ({exc.msg}); fix or remove that line") from None
        if not isinstance(row, dict):
            raise AigcError(f'{source} line {number} is not a JSON object; each line must be {{"field": value, ...}}')
        yield number, row


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSONL file, ignoring a torn last line left by a crash mid-append."""
    records = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise
    return records


@contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty folder beside `target` to fill; on success it replaces `target` whole, on error
    (or Ctrl-C) it is removed and `target` is left as it was. So a folder at `target` is always
    complete. The staging name is fixed (`.NAME.partial`): what a killed run left is cleared first."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging, old = target.parent / f".{target.name}.partial", target.parent / f".{target.name}.old"
    for stale in (staging, old):
        if stale.exists():
            shutil.rmtree(stale)
    staging.mkdir()
    try:
        yield staging
        if target.exists():
            os.replace(target, old)  # a folder cannot be renamed over a non-empty one
        os.replace(staging, target)
        _fsync_dir(target.parent)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
