"""`RUN/state.pt`: the training state that `aigc train --resume` continues from."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from aigc.artifacts.run import STATE
from aigc.errors import AigcError
from aigc.fsutil import write_stream


def save_state(run_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state.pt` atomically. `state` holds only tensors, numbers, strings, lists and dicts,
    so that `load_state` can read it back with `weights_only=True` (no pickled code). A checksum of
    the content goes in too: a flipped bit in a tensor would otherwise load without complaint."""
    state = {**state, "checksum": state_checksum(state)}
    # Through a file object that reports a refused write (disk full) as the OSError it is.
    write_stream(Path(run_dir) / STATE, lambda f: torch.save(state, f))


def state_checksum(state: Any) -> str:
    """BLAKE2b of everything in `state` (the `checksum` entry itself left out), keys in sorted order."""
    digest = hashlib.blake2b(digest_size=16)
    _feed(digest, {k: v for k, v in state.items() if k != "checksum"})
    return digest.hexdigest()


def _feed(digest, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().cpu().contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{tuple(value.shape)}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in sorted(value, key=repr):
            digest.update(repr(key).encode())
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:  # numbers, strings, None, booleans
        digest.update(f"{type(value).__name__}:{value!r};".encode())


def load_state(run_dir: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read `state.pt`; a missing or damaged file is a user error that names it."""
    path = Path(run_dir) / STATE
    if not path.is_file():
        raise AigcError(f"cannot resume {run_dir}: {STATE} is missing; start a new run with --overwrite instead")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, runtime) for a damaged file
        raise AigcError(
            f"{path} is corrupted ({type(exc).__name__}); resume is impossible, start again with --overwrite"
        ) from exc
    if not isinstance(state, dict) or "step" not in state:
        raise AigcError(f"{path} is not an aigc training state; start again with --overwrite")
    # States written before the checksum have none; they are read as they are.
    if "checksum" in state and state.pop("checksum") != state_checksum(state):
        raise AigcError(f"{path} is corrupted (checksum mismatch); resume is impossible, start again with --overwrite")
    return state
