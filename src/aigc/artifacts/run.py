"""The run folder: its layout, its typed config, and the one loader every reader goes through.

A run folder is self-contained and is what a user passes around:

    RUN/config.json        model + training config, data provenance, what the weights are (`RunConfig`)
    RUN/tokenizer.json     the tokenizer the model was trained with
    RUN/model.safetensors  latest weights
    RUN/best.safetensors   weights with the best validation loss
    RUN/state.pt           optimizer, schedule, step, RNG, sampler position (tensors only; `state.py`)
    RUN/metrics.jsonl      one JSON object per evaluation
    RUN/chat_template.jinja  the chat template, when the run chats (its origin: config's chat_template_source)
    RUN/plots/, RUN/eval/, RUN/tensorboard/, RUN/report.md, RUN/report.html

`load_run` builds the model through the weights-loader registry (`registry.py`): `aigc.models`
registers the built-in formats, so callers load runs with `aigc.models.load_run`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from aigc import __version__
from aigc.artifacts.registry import weights_loader
from aigc.config import ModelConfig, TrainConfig, from_dict, to_dict
from aigc.errors import AigcError
from aigc.fsutil import read_jsonl, remove_stale_temp_files, write_json, write_with
from aigc.tokenizer import Tokenizer

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
WEIGHTS = "model.safetensors"
BEST = "best.safetensors"
STATE = "state.pt"
METRICS = "metrics.jsonl"
CHAT_TEMPLATE = "chat_template.jinja"  # Jinja chat template (imported, or carried over by fine-tuning)
PLOTS = "plots"
EVAL = "eval"
TENSORBOARD = "tensorboard"
REPORTS = ("report.md", "report.html")
# Files and folders a run owns; `aigc train --overwrite` removes these and nothing else.
RUN_ARTEFACTS = (CONFIG, TOKENIZER, WEIGHTS, BEST, STATE, METRICS, CHAT_TEMPLATE, PLOTS, EVAL, TENSORBOARD, *REPORTS)
# What aigc writes inside the run's folders (glob patterns); anything else a user put there is kept.
RUN_FOLDER_FILES = {
    PLOTS: ("loss.png", "accuracy.png"),
    EVAL: ("metrics.json", "compare.png"),
    TENSORBOARD: ("events.out.tfevents.*",),
}

WEIGHT_FORMATS = ("full", "lora", "int8", "quantized")


@dataclass(frozen=True)
class Weights:
    """What `model.safetensors` holds.

    full: every parameter of the model in `config.model`.
    lora: LoRA adapters (`lora` = `LoRASpec.to_json()`) over the run `base` (a pulled model's name or a
      folder; full or quantized weights) whose model.safetensors has the sha256 `base_sha256`; the file
      holds the adapters (and the rows of added tokens) only. Runs written before `base` was set hold
      the base weights too.
    int8: dynamically quantized linear layers (`quantization` describes the scheme; see models/int8.py).
    quantized: GGML block-quantised layers kept as a GGUF file holds them (`quantization` names the
      types; see models/qlinear.py).
    """

    format: str = "full"
    lora: dict[str, Any] | None = None
    quantization: dict[str, Any] | None = None
    base: str | None = None
    base_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.format not in WEIGHT_FORMATS:
            raise AigcError(f"unknown weights format {self.format!r}; aigc reads: {', '.join(WEIGHT_FORMATS)}")
        if (self.format == "lora") != (self.lora is not None):
            raise AigcError("weights of format 'lora' (and only those) carry LoRA settings; config.json was edited")
        if (self.format in ("int8", "quantized")) != (self.quantization is not None):
            raise AigcError(
                "weights of format 'int8' or 'quantized' (and only those) carry a quantization scheme; "
                "config.json was edited"
            )

    @property
    def is_plain(self) -> bool:
        return self.format == "full"


@dataclass(frozen=True)
class RunConfig:
    """What `config.json` holds: enough to rebuild the model and know where it came from."""

    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    data: dict[str, Any] = field(default_factory=dict)  # provenance: dataset path, labels, fingerprints
    init_from: str | None = None
    weights: Weights = field(default_factory=Weights)
    extra: dict[str, Any] = field(default_factory=dict)  # provenance only: parameter counts, import source
    # Where RUN/chat_template.jinja came from: {"from": "import" | "instruction data" | "base" | "file",
    # "path": ...}; None when the run has none (or was written before this field).
    chat_template_source: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "aigc_version": __version__,
            "model": to_dict(self.model),
            "train": to_dict(self.train),
            "data": self.data,
            "init_from": self.init_from,
            "weights": dataclasses.asdict(self.weights),
            "extra": self.extra,
            "chat_template_source": self.chat_template_source,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunConfig:
        extra = dict(obj.get("extra", {}))
        if "weights" in obj:
            weights = Weights(**obj["weights"])
        else:  # written before the `weights` field: the format was a key in `extra`
            lora, quantization = extra.pop("lora", None), extra.pop("quantization", None)
            fmt = "lora" if lora else "int8" if quantization else "full"
            weights = Weights(format=fmt, lora=lora, quantization=quantization)
        return cls(
            model=from_dict(ModelConfig, obj["model"]),
            train=from_dict(TrainConfig, obj.get("train", {})),
            data=obj.get("data", {}),
            init_from=obj.get("init_from"),
            weights=weights,
            extra=extra,
            chat_template_source=obj.get("chat_template_source"),
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
        return read_metrics(self.path)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The metrics of a run (empty if it has none yet); a damaged file is a user error naming it."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    try:
        return read_jsonl(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise AigcError(f"{path} is corrupted{where}; delete the bad line or start again with --overwrite") from exc


def save_config(run_dir: str | os.PathLike, config: RunConfig) -> None:
    write_json(Path(run_dir) / CONFIG, config.to_json())


def save_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Save weights as safetensors, atomically. Tied weights are stored once."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    write_with(path, lambda tmp: save_model(model, str(tmp)))


def load_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Fill `model` from a safetensors file whose tensors must match it exactly."""
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise AigcError(f"weights file {path} is corrupted or incompatible ({exc}); retrain or restore it") from exc
    if missing or unexpected:
        raise AigcError(
            f"weights file {path} does not match the model in config.json "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}); was the run edited by hand?"
        )


def stored_parameter_count(path: str | os.PathLike) -> int | None:
    """Parameters in a safetensors file, from its header alone (None if absent or unreadable)."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            return sum(math.prod(f.get_slice(name).get_shape()) for name in f.keys())
    except (SafetensorError, OSError):
        return None


def save_run(run_dir: str | os.PathLike, config: RunConfig, tokenizer: Tokenizer, model: nn.Module) -> Path:
    """Write weights, tokenizer and config: the minimum that `load_run` needs. The weights go first:
    the largest write is the likeliest to fail (a full disk), and then a run being replaced
    (`--overwrite`) is left whole as it was, not with the new config over the old weights."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, run_dir / WEIGHTS)
    tokenizer.save(run_dir / TOKENIZER)
    save_config(run_dir, config)
    return run_dir


# Built-in pretrained models: `aigc pull NAME` converts them into `models_home() / NAME`.
BUILT_IN_MODELS = ("smollm2-135m",)


def copy_chat_template(source: str | os.PathLike, run_dir: str | os.PathLike) -> bool:
    """Copy a chat template file (a run's or a dataset's, or any path) into `run_dir`, atomically; False
    when there is none to copy."""
    source = Path(source)
    source = source / CHAT_TEMPLATE if source.is_dir() else source
    if not source.is_file():
        return False
    write_with(Path(run_dir) / CHAT_TEMPLATE, lambda tmp: shutil.copyfile(source, tmp))
    return True


def aigc_home() -> Path:
    """aigc's own files outside any run (pulled models, compiled kernels): $AIGC_HOME, by default ~/.cache/aigc."""
    return Path(os.environ.get("AIGC_HOME") or Path.home() / ".cache" / "aigc")


def models_home() -> Path:
    """Where pulled models live: $AIGC_HOME/models, by default ~/.cache/aigc/models."""
    return aigc_home() / "models"


def resolve_run_dir(run_dir: str | os.PathLike) -> Path:
    """A run folder as given, or, for the name of a built-in model, the folder it was pulled to."""
    path = Path(run_dir)
    if path.exists() or str(run_dir) not in BUILT_IN_MODELS:
        return path
    pulled = models_home() / str(run_dir)
    if not (pulled / CONFIG).is_file():
        raise AigcError(f"{run_dir} is not pulled yet; run `aigc pull {run_dir}` first")
    return pulled


def read_run_config(run_dir: str | os.PathLike) -> RunConfig:
    run_dir = resolve_run_dir(run_dir)
    if not run_dir.is_dir():
        raise AigcError(f"run folder not found: {run_dir}; train one with `aigc train --data DIR --out {run_dir}`")
    path = run_dir / CONFIG
    if not path.is_file():
        raise AigcError(f"{run_dir} is not a run (no {CONFIG}); pass a folder made by `aigc train`")
    try:
        return RunConfig.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise AigcError(f"{path} is corrupted ({type(exc).__name__}: {exc}); restore it or retrain the run") from exc


def read_run_tokenizer(run_dir: str | os.PathLike, config: RunConfig) -> Tokenizer:
    """The run's tokenizer, checked against the model's vocabulary."""
    path = Path(run_dir) / TOKENIZER
    labels = config.data.get("labels")  # recorded by every writer of a run; absent in hand-made ones
    tokenizer = Tokenizer.load(path, labels)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise AigcError(
            f"{path} has {tokenizer.vocab_size} tokens but the model only {config.model.vocab_size}; "
            "the tokenizer does not belong to these weights"
        )
    return tokenizer


def load_run(run_dir: str | os.PathLike, *, device: str | torch.device = "cpu", weights: str = WEIGHTS) -> Run:
    """Load config, tokenizer and weights of a run (a folder or a pulled model's name); every reader
    of a run goes through here."""
    run_dir = resolve_run_dir(run_dir)
    config = read_run_config(run_dir)
    for name in (TOKENIZER, weights):
        if not (run_dir / name).is_file():
            raise AigcError(f"run {run_dir} is incomplete: {name} is missing; finish or resume training first")
    tokenizer = read_run_tokenizer(run_dir, config)
    model = weights_loader(config.weights.format)(config, run_dir / weights)
    model.to(device).eval()
    return Run(path=run_dir, config=config, tokenizer=tokenizer, model=model)


def require_plain_weights(config: RunConfig, run_dir: str | os.PathLike, action: str, *, verb: str = "use") -> None:
    """Refuse `action` on a LoRA or int8 run, naming the way to a plain one (`verb` the fp32 source)."""
    fmt = config.weights.format
    if fmt == "lora":
        raise AigcError(f"{action}: {run_dir} is a LoRA run; merge its adapters first: `aigc merge {run_dir}`")
    if fmt == "int8":
        source = (config.weights.quantization or {}).get("source", "the fp32 run it was made from")
        raise AigcError(f"{action}: run {run_dir} is already int8 (dynamically quantized); {verb} {source} instead")
    if fmt == "quantized":
        source = (config.weights.quantization or {}).get("source", "the original model")
        raise AigcError(
            f"{action}: run {run_dir} holds block-quantised weights; {verb} an fp32 run instead "
            f"(import {source} with --dequantize)"
        )


def prepare_out_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> Path:
    """Create an output folder; refuse to write into a non-empty one unless told to."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AigcError(f"--out {out} is a file; pass a folder path")
    remove_stale_temp_files(out)  # what a killed import/export left; it does not make the folder "not empty"
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AigcError(f"--out {out} is not empty; choose a new folder or pass --overwrite")
    out.mkdir(parents=True, exist_ok=True)
    return out
