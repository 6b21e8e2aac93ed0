"""LoRA runs stored apart from their base: the run's `model.safetensors` holds only what trained
(`….lora_A` / `….lora_B`, and `wte.new_rows` when labels grew the vocabulary); config.json names the
base (`weights.base`: a pulled model's name or an absolute folder) and its content hash
(`weights.base_sha256`, of the base's model.safetensors). Loading rebuilds the base, checks the hash,
grows the vocabulary and applies the adapters. A base that is gone or changed is a one-line error.

The base may be a quantised run (QLoRA): its layers stay in their blocks, memory-mapped, and the
grown rows sit beside the quantised table (`vocab.grow_frozen`) rather than in an expanded copy.
"""

from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from aigc.artifacts.run import BUILT_IN_MODELS, WEIGHTS, RunConfig, load_weights, read_run_config, resolve_run_dir
from aigc.errors import AigcError
from aigc.fsutil import write_with
from aigc.models import vocab
from aigc.models.build import build_model
from aigc.models.lora import LoRASpec, apply_lora
from aigc.models.qlayers import quantised_weights
from aigc.models.qlinear import load_quantised_model


def base_reference(init_from: str | os.PathLike) -> str:
    """How a LoRA run names its base: a built-in model by name (portable), any other run by absolute path."""
    if str(init_from) in BUILT_IN_MODELS and not Path(init_from).exists():
        return str(init_from)
    return str(resolve_run_dir(init_from).resolve())


def weights_sha256(run_dir: str | os.PathLike) -> str:
    path = Path(run_dir) / WEIGHTS
    stat = path.stat()
    return _sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hash of a file, remembered per (path, size, mtime): a 540 MB base is read once per process."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def load_base(base: str, sha256: str | None) -> tuple[RunConfig, nn.Module]:
    """The base run's config and model (full or quantised weights), after checking it is the one the
    adapters were made on."""
    run_dir = resolve_run_dir(base)
    if not (run_dir / WEIGHTS).is_file():
        how = f"`aigc pull {base}`" if base in BUILT_IN_MODELS else "restore that folder"
        raise AigcError(f"the base run {base} of these LoRA adapters is missing; {how}, then try again")
    if sha256 is not None and weights_sha256(run_dir) != sha256:
        raise AigcError(
            f"the base run {base} changed since the adapters were trained (sha256 {weights_sha256(run_dir)[:12]}, "
            f"expected {sha256[:12]}); restore the original base or train the adapters again"
        )
    config = read_run_config(run_dir)
    if config.weights.format == "quantized":
        return config, load_quantised_model(config, run_dir / WEIGHTS)
    if not config.weights.is_plain:
        raise AigcError(
            f"the base run {base} has {config.weights.format} weights; a LoRA base must be a plain or quantised run"
        )
    model = build_model(config.model)
    load_weights(model, run_dir / WEIGHTS)
    return config, model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (tied ones once), detached: what a LoRA run stores."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: str | os.PathLike) -> None:
    """Write only the trained tensors of `model` as safetensors, atomically."""
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    model = getattr(model, "module", model)  # unwrap DistributedDataParallel
    state = trainable_state(model)
    write_with(path, lambda tmp: save_file(state, str(tmp)))


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Fill the trainable parameters of `model` from `state`; both must name exactly the same tensors."""
    expected = set(trainable_state(model))
    if set(state) != expected:
        raise ValueError(
            f"adapter tensors differ: missing {sorted(expected - set(state))[:3]}, "
            f"unexpected {sorted(set(state) - expected)[:3]}"
        )
    model.load_state_dict(state, strict=False)


def load_lora_run(config: RunConfig, weights: Path) -> nn.Module:
    """The weights loader of a LoRA run stored apart from its base (see the module docstring)."""
    _, model = load_base(config.weights.base, config.weights.base_sha256)
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise AigcError(f"adapter file {weights} is corrupted ({exc}); retrain or restore it") from exc
    wte_rows, head_rows = tensors.pop(f"wte.{vocab.NEW_ROWS}", None), tensors.pop(f"lm_head.{vocab.NEW_ROWS}", None)
    if wte_rows is not None:  # a quantised table stays quantised; a float one grows in place
        (vocab.grow_frozen if quantised_weights(model) else vocab.grow)(model, wte_rows, head_rows)
    if model.wte.num_embeddings != config.model.vocab_size:
        raise AigcError(
            f"{weights} grows the base's vocabulary to {model.wte.num_embeddings} tokens, config.json says "
            f"{config.model.vocab_size}; the run was edited or its base changed"
        )
    apply_lora(model, LoRASpec.from_json(config.weights.lora))
    try:
        load_trainable_state(model, tensors)
    except ValueError as exc:
        raise AigcError(f"{weights} does not fit its base {config.weights.base} ({exc}); retrain the adapters") from exc
    return model
