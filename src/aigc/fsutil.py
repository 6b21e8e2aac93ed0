"""Atomic file writes: write to a temp file in the same folder, then rename over the target.

A crash or `kill -9` at any moment leaves either the old file or the new one, never half of one. A
write the file system refuses (disk full, quota, file size limit) is an AigcError saying so, with the
old file untouched and the temp file removed. SIGTERM, while `sigterm_raises` is active (the CLI),
becomes a `Terminated` exception, so `finally` blocks remove temp files as they do for any error;
`uninterrupted` defers it over steps that must not be split (swapping a folder into place). What a
`kill -9` leaves behind, `remove_stale_temp_files` removes on the next run into the same folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from aigc.errors import AigcError, check_text


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
    except Exception as exc:
        reason = write_refused(exc)
        if reason is None:
            raise
        raise AigcError(
            f"cannot write {path}: {reason} and run again (nothing was replaced: {path.name} is as it was before)"
        ) from exc
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


# Why the file system refuses a write: no space, no quota left, or over the file size limit (RLIMIT_FSIZE).
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_OS_ERROR = re.compile(r"os error (\d+)")  # how Rust libraries (safetensors) spell an errno in their messages


def write_refused(exc: BaseException | None) -> str | None:
    """The operating system's reason and the fix when `exc`, or an error that caused it, is a write
    refused for lack of room ("No space left on device; free some space"); None for any other error."""
    while exc is not None:
        code = exc.errno if isinstance(exc, OSError) else None
        found = _OS_ERROR.search(str(exc))
        code = code if code in _NO_ROOM else int(found.group(1)) if found else None
        if code in _NO_ROOM:
            fix = "raise the file size limit (ulimit -f)" if code == errno.EFBIG else "free some space"
            return f"{os.strerror(code)}; {fix}"
        exc = exc.__cause__ or exc.__context__
    return None


class _WholeWrites:
    """A write-only file object whose `write` writes every byte or raises the OSError. Through a
    buffered file, a write cut short by a full disk is reported only as a short count, and
    `torch.save` then fails with "enforce fail at inline_container.cc" and no cause."""

    def __init__(self, fd: int):
        self.fd = fd

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        while view:
            view = view[os.write(self.fd, view) :]
        return len(memoryview(data).cast("B"))

    def flush(self) -> None:
        pass


def write_stream(path: str | os.PathLike, writer: Callable[[Any], None]) -> None:
    """Call `writer(file_object)` and atomically move the result to `path` (for `torch.save`)."""
    with atomic_path(path) as tmp:
        fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC)
        try:
            writer(_WholeWrites(fd))
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
        _check_strings(row, f"{source} line {number}")
        yield number, row


def _check_strings(value: Any, line: str, path: str = "") -> None:
    """Every string in a parsed JSON value (keys too) is valid UTF-8: JSON may escape lone surrogates.
    The error names the line and the path to the value (`train.jsonl line 3: messages[0].content`)."""
    if isinstance(value, str):
        check_text(value, f"{line}: {path or 'the value'}")
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(key, f"{line}: a key")
            _check_strings(item, line, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_strings(item, line, f"{path}[{i}]")


def read_user_text(path: str | os.PathLike, *, what: str, encoding: str = "utf-8") -> str:
    """A user's text file, decoded strictly; bytes that are not UTF-8 are an AigcError naming the line.
    (`encoding="utf-8-sig"` also drops a byte-order mark.)"""
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise AigcError(
            f"{what} {path} line {line} is not valid UTF-8 (byte 0x{data[exc.start]:02X}: {exc.reason}); "
            "save the file as UTF-8"
        ) from None


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


# -------------------------------------------------------------------------------------------------
# SIGTERM, and what a killed process leaves behind
# -------------------------------------------------------------------------------------------------


class Terminated(BaseException):
    """SIGTERM, raised in the main thread. A BaseException like KeyboardInterrupt, so that no
    `except Exception` mistakes it for a damaged file, and unlike it, so that no Ctrl-C handler
    (interactive chat, the trainer's stop-after-this-step) treats it as a request to carry on."""


_deferral = threading.local()  # .depth: nesting of `uninterrupted`; .pending: a SIGTERM came inside


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While active, SIGTERM raises `Terminated` in the main thread (outside `uninterrupted` blocks)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread
        return

    def handler(signum, frame):
        if getattr(_deferral, "depth", 0):
            _deferral.pending = True
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def uninterrupted() -> Iterator[None]:
    """A SIGTERM that arrives inside is acted on at the end, so the steps within are never split."""
    _deferral.depth = getattr(_deferral, "depth", 0) + 1
    try:
        yield
    finally:
        _deferral.depth -= 1
    if _deferral.depth == 0 and getattr(_deferral, "pending", False):
        _deferral.pending = False
        raise Terminated()


# atomic_path's temp files, and the ones safetensors writes beside its target before renaming it
_TEMP_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$|^\.tmp[A-Za-z0-9]{6}$")


def is_stale_temp_file(path: Path) -> bool:
    return bool(_TEMP_FILE.match(path.name)) and path.is_file() and not path.is_symlink()


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files a killed aigc process left in `folder` (its own naming patterns only).
    Called by a command that is about to write `folder`; two aigc processes writing one folder at
    once are not supported anyway."""
    folder = Path(folder)
    stale = sorted(p for p in folder.iterdir() if is_stale_temp_file(p)) if folder.is_dir() else []
    for path in stale:
        path.unlink()
    return stale


def remove_stale_temp_folders(target: str | os.PathLike) -> list[Path]:
    """Remove the `.NAME.tmp-XXXXXXXX` folders (tempfile.mkdtemp's) that a killed process building
    `target` left beside it."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(target.name)}\.tmp-[a-z0-9_]{{8}}$")
    stale = sorted(p for p in target.parent.iterdir() if pattern.match(p.name) and p.is_dir() and not p.is_symlink())
    for path in stale:
        shutil.rmtree(path)
    return stale


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
