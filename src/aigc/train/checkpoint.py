"""The run directory: the only place that saves and loads checkpoints.

A run directory is self-contained and is what a user passes around:

    RUN/config.json        model + training config, data provenance (`RunConfig`)
    RUN/tokenizer.json     the tokenizer the model was trained with
    RUN/model.safetensors  latest weights
    RUN/best.safetensors   weights with the best validation loss
    RUN/state.pt           optimizer, schedule, step, RNG, sampler position (tensors only)
    RUN/metrics.jsonl      one JSON object per evaluation
    RUN/plots/, RUN/eval/, RUN/report.md, RUN/report.html

Everything that reads a run (generate, eval, serve, export) goes through `load_run`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from aigc import __version__
from aigc.config import ModelConfig, TrainConfig, from_dict, to_dict
from aigc.errors import AigcError
from aigc.fsutil import read_jsonl, write_json, write_with
from aigc.models import build_model
from aigc.tokenizer import Tokenizer

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
WEIGHTS = "model.safetensors"
BEST = "best.safetensors"
STATE = "state.pt"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class RunConfig:
    """What `config.json` holds: enough to rebuild the model and know where it came from."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: dict[str, Any] = field(default_factory=dict)  # provenance: dataset path, labels, fingerprints
    init_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. LoRA settings, import source

    def to_json(self) -> dict[str, Any]:
        return {
            "aigc_version": __version__,
            "model": to_dict(self.model),
            "train": to_dict(self.train),
            "data": self.data,
            "init_from": self.init_from,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunConfig:
        return cls(
            model=from_dict(ModelConfig, obj["model"]),
            train=from_dict(TrainConfig, obj.get("train", {})),
            data=obj.get("data", {}),
            init_from=obj.get("init_from"),
            extra=obj.get("extra", {}),
        )


@dataclass
class Run:
    """A loaded run: its folder, config, tokenizer and model (in eval mode)."""

    path: Path
    config: RunConfig
    tokenizer: Tokenizer
    model: nn.Module

    @property
    def labels(self) -> tuple[str, ...]:
        return self.tokenizer.labels

    def metrics(self) -> list[dict]:
        path = self.path / METRICS
        return read_jsonl(path) if path.exists() else []


def save_config(run_dir: str | os.PathLike, config: RunConfig) -> None:
    write_json(Path(run_dir) / CONFIG, config.to_json())


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Save weights as safetensors, atomically. Tied weights are stored once."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    write_with(path, lambda tmp: save_model(model, str(tmp)))


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise AigcError(f"weights file {path} is corrupted or incompatible ({exc}); retrain or restore it") from exc
    if missing or unexpected:
        raise AigcError(
            f"weights file {path} does not match the model in config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); was the run edited by hand?"
        )


def save_run(run_dir: str | os.PathLike, config: RunConfig, tokenizer: Tokenizer, model: nn.Module) -> Path:
    """Write config, tokenizer and weights: the minimum that `load_run` needs."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir, config)
    tokenizer.save(run_dir / TOKENIZER)
    save_weights(model, run_dir / WEIGHTS)
    return run_dir


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AigcError(f"run folder not found: {run_dir}; train one with `aigc train --data DIR --out {run_dir}`")
    path = run_dir / CONFIG
    if not path.is_file():
        raise AigcError(f"{run_dir} is not a run (no {CONFIG}); pass a folder made by `aigc train`")
    try:
        return RunConfig.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AigcError(f"{path} is corrupted ({exc}); restore it or retrain the run") from exc


def load_run(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu", weights: str = WEIGHTS) -> Run:
    """Load config, tokenizer and weights of a run; every reader of a run goes through here."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    for name in (TOKENIZER, weights):
        if not (run_dir / name).is_file():
            raise AigcError(f"run {run_dir} is incomplete: {name} is missing; finish or resume training first")
    tokenizer = Tokenizer.load(run_dir / TOKENIZER)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise AigcError(
            f"{run_dir / TOKENIZER} has {tokenizer.vocab_size} tokens but the model only {config.model.vocab_size}; "
            "the tokenizer does not belong to these weights"
        )
    if config.extra.get("quantization"):  # a folder from `aigc export --format int8`
        from aigc.interop.quantize import load_int8_model

        model = load_int8_model(config, run_dir / weights)
    else:
        model = build_model(config.model)
        if config.extra.get("lora"):  # the adapters are in the weights file: rebuild them first
            from aigc.models.lora import LoRASpec, apply_lora

            apply_lora(model, LoRASpec.from_json(config.extra["lora"]))
        load_weights(model, run_dir / weights)
    model.to(device).eval()
    return Run(path=run_dir, config=config, tokenizer=tokenizer, model=model)


# ---------------------------------------------------------------------------------------------
# Training state (for `aigc train --resume`)
# ---------------------------------------------------------------------------------------------


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
        raise AigcError(f"{path} is corrupted ({type(exc).__name__}); resume is impossible, start again with --overwrite") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise AigcError(f"{path} is not an aigc training state; start again with --overwrite")
    return state
