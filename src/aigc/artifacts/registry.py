"""Where weight loaders plug in: one function per weights format (`Weights.format` in config.json).

A loader takes the run's config and the path of its weights file and returns the model, weights
loaded. `aigc.models` registers the built-in formats (full, lora, int8) when it is imported; a new
format registers itself the same way, so this layer never imports the layers above it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aigc.errors import AigcError

if TYPE_CHECKING:  # type names only: importing run.py here would be circular
    import torch.nn as nn

WeightsLoader = Callable[[Any, Path], "nn.Module"]  # (RunConfig, weights path) -> model

_LOADERS: dict[str, WeightsLoader] = {}


def register_weights_loader(fmt: str, loader: WeightsLoader) -> None:
    """Make runs whose weights are of format `fmt` loadable."""
    _LOADERS[fmt] = loader


def weights_loader(fmt: str) -> WeightsLoader:
    if fmt not in _LOADERS:
        known = ", ".join(sorted(_LOADERS)) or "none (import aigc.models first)"
        raise AigcError(f"no loader for weights of format {fmt!r}; this aigc loads: {known}")
    return _LOADERS[fmt]
