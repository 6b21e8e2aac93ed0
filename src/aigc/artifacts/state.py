"""`RUN/state.pt`: the training state that `aigc train --resume` continues from."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from aigc.artifacts.run import STATE
from aigc.errors import AigcError
from aigc.fsutil import write_with


def save_state(run_dir: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write `state.pt` atomically. `state` holds only tensors, numbers, strings, lists and dicts,
    so that `load_state` can read it back with `weights_only=True` (no pickled code)."""
    write_with(Path(run_dir) / STATE, lambda tmp: torch.save(state, tmp))


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
    return state
