"""Publishing a dataset folder: refuse to clobber what must not be replaced, swap in atomically.

The dataset is built in a temp folder beside DIR; `publish` renames it into place. An existing dataset
is moved aside first and deleted only after the rename, and restored if the rename fails.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from aigc.artifacts.dataset import DATASET_JSON
from aigc.errors import AigcError
from aigc.fsutil import remove_stale_temp_folders, uninterrupted


def existing_dataset(out: Path, checksum: str, options: dict, overwrite: bool) -> dict | None:
    """The existing dataset in `out` when it is the same one; raises when `out` must not be replaced."""
    remove_stale_temp_folders(out)  # what a killed prepare left beside it
    if not out.exists():
        return None
    if not out.is_dir():
        raise AigcError(f"--out {out} is a file; give a folder path for the dataset")
    if not any(out.iterdir()):
        return None
    info_path = out / DATASET_JSON
    if not info_path.is_file():
        raise AigcError(f"--out {out} is not empty and holds no dataset; choose a new or empty folder")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = {}
    if overwrite:
        return None
    if info.get("source_sha256") == checksum and info.get("options") == options:
        return info
    raise AigcError(
        f"--out {out} already holds a different dataset (from {info.get('source', 'an unknown source')}); "
        "pass --overwrite to replace it, or choose another folder"
    )


def publish(tmp: Path, out: Path) -> None:
    """Move the finished dataset into place; an old one is swapped out first and restored on failure."""
    _use_default_permissions(tmp)
    with uninterrupted():  # a SIGTERM between the renames would leave the dataset moved aside
        _swap_in(tmp, out)


def _swap_in(tmp: Path, out: Path) -> None:
    if out.is_dir() and not any(out.iterdir()):
        # An empty folder the user made (maybe their working directory) keeps its identity: the files
        # move in one by one and dataset.json, the mark of a complete dataset, comes last.
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == DATASET_JSON):
            os.replace(path, out / path.name)
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _use_default_permissions(folder: Path) -> None:
    """mkdtemp/mkstemp create owner-only (0700/0600) entries; a published dataset gets the usual
    permissions that the user's umask gives new files, like any folder they create."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)
