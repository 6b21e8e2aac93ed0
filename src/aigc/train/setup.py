"""Everything decided before the first step: configs, dataset, run folder, model.

All checks run before anything is written, so a refused run leaves existing files untouched.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch.nn as nn

from aigc.artifacts.dataset import Dataset, check_same_tokenizer, open_dataset
from aigc.artifacts.run import (
    CONFIG,
    RUN_ARTEFACTS,
    RUN_FOLDER_FILES,
    STATE,
    TOKENIZER,
    RunConfig,
    copy_chat_template,
    read_run_config,
    read_run_tokenizer,
    require_plain_weights,
    resolve_run_dir,
)
from aigc.config import ModelConfig, TrainConfig, finetune_train_config, model_preset, train_preset
from aigc.errors import AigcError
from aigc.fsutil import is_stale_temp_file
from aigc.models import kinds
from aigc.tokenizer import Tokenizer
from aigc.train.batches import check_split_size, document_starts

MODEL_SHAPE_FIELDS = (
    "kind",
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "hidden_size",
    "bias",
    "norm",
    "positions",
    "mlp",
    "ffn_hidden",
    "n_kv_head",
    "qkv_bias",
    "tie_embeddings",
)


@dataclass
class SessionPlan:
    """The resolved inputs of one training session."""

    run_dir: Path
    data: Dataset
    model_config: ModelConfig
    train_config: TrainConfig
    resume: bool
    init_from: str | None

    @property
    def seq_len(self) -> int:
        """Tokens per training window: --seq-len, or the model's whole context."""
        return self.train_config.seq_len or self.model_config.block_size


def window_starts(plan: SessionPlan) -> np.ndarray | None:
    """Where training windows may start (None: anywhere). `--windows auto` opens documents when the
    data has labels: every window then starts with its control token, as each labelled generation
    does, so all of the fine-tuning signal says what the label means. At random offsets most windows
    of 128 tokens miss the start of a review of ~300, and the label's token with it."""
    choice = plan.train_config.windows
    train = plan.data.train
    if choice == "auto":
        choice = "documents" if plan.data.tokenizer.labels and (train.docs[:, 2] >= 0).any() else "anywhere"
    return document_starts(train.docs, len(train.tokens), plan.seq_len) if choice == "documents" else None


def _check_same_tokenizer(data: Dataset, tokenizer: Tokenizer, owner: Path) -> None:
    check_same_tokenizer(data.path, data.tokenizer, tokenizer, owner)


def plan_session(
    data_dir: str | Path | None,
    out_dir: str | Path,
    model_config: ModelConfig | None,
    train_config: TrainConfig | None,
    *,
    preset: str,
    resume: bool,
    init_from: str | Path | None,
) -> SessionPlan:
    """Resolve the configs of a new, resumed or fine-tuning run and check them against the data."""
    run_dir = Path(out_dir)
    if resume:
        saved = read_run_config(run_dir)
        if model_config is not None and model_config != saved.model:
            raise AigcError(f"--resume keeps the model of {run_dir}; drop the model options (--preset, --n-layer, ...)")
        data_dir = data_dir if data_dir is not None else saved.data.get("path")
        if not data_dir:
            raise AigcError(f"{run_dir / CONFIG} does not say which dataset it was trained on; pass --data DIR")
        data = open_dataset(data_dir)
        _check_same_tokenizer(data, Tokenizer.load(run_dir / TOKENIZER), run_dir)
        plan = SessionPlan(run_dir, data, saved.model, train_config or saved.train, True, saved.init_from)
    elif init_from is not None:
        if data_dir is None:
            raise AigcError("--init-from needs --data: the prepared dataset to fine-tune on")
        base = read_run_config(init_from)
        if base.weights.format != "quantized":  # a quantised base trains through LoRA: checked below
            require_plain_weights(base, init_from, "--init-from")
        if model_config is not None and _shape(model_config) != _shape(base.model):
            raise AigcError(
                f"--init-from takes the model shape from {init_from}; drop the model options (--preset, --n-layer, ...)"
            )
        data = open_dataset(data_dir)
        config = _finetune_model(data, base, Path(init_from))
        config = config if model_config is None else dataclasses.replace(config, dropout=model_config.dropout)
        if train_config is None:  # a pretrained (imported) base is fine-tuned with LoRA unless told otherwise
            train_config = finetune_train_config() if "imported_from" in base.extra else TrainConfig()
        _check_quantised_base(base, init_from, train_config)
        plan = SessionPlan(run_dir, data, config, train_config, False, str(init_from))
    else:
        if data_dir is None:
            raise AigcError("--data is required: a folder made by `aigc prepare SOURCE --out DIR`")
        data = open_dataset(data_dir)
        config = model_config or model_preset(preset)
        # The vocabulary always comes from the dataset's tokenizer.
        config = dataclasses.replace(config, vocab_size=data.tokenizer.vocab_size)
        plan = SessionPlan(run_dir, data, config, train_config or train_preset(preset), False, None)
    _check_sizes(plan)
    return plan


def _check_quantised_base(base: RunConfig, init_from: str | Path, train_config: TrainConfig) -> None:
    """A quantised base's blocks cannot take gradient steps: only adapters over them train (QLoRA)."""
    if base.weights.format == "quantized" and train_config.lora_rank == 0:
        source = (base.weights.quantization or {}).get("source", "the original model")
        raise AigcError(
            f"--init-from: {init_from} holds block-quantised weights, which train only through LoRA adapters; "
            f"pass --lora-rank R (e.g. 16), or import {source} with --dequantize for full fine-tuning"
        )


def _finetune_model(data: Dataset, base: RunConfig, init_from: Path) -> ModelConfig:
    """The model of a fine-tuning run: the base's, with the vocabulary grown when `aigc prepare` appended
    control tokens to the base's tokenizer (the dataset records the base tokenizer's fingerprint)."""
    base_dir = resolve_run_dir(init_from)
    tokenizer = read_run_tokenizer(base_dir, base)
    if data.info.get("base_tokenizer_fingerprint") != tokenizer.vocab_fingerprint():
        _check_same_tokenizer(data, tokenizer, init_from)
        return base.model
    if not kinds.grows_vocabulary(base.model):
        raise AigcError(f"{data.path} adds label tokens to {init_from}'s vocabulary; only a GPT can grow it")
    return dataclasses.replace(base.model, vocab_size=max(base.model.vocab_size, data.tokenizer.vocab_size))


def _shape(config: ModelConfig) -> tuple:
    return tuple(getattr(config, name) for name in MODEL_SHAPE_FIELDS)


def _check_sizes(plan: SessionPlan, world_size: int = 1) -> None:
    block = plan.seq_len
    if block > plan.model_config.block_size:
        raise AigcError(f"--seq-len {block} exceeds the model's context of {plan.model_config.block_size} tokens")
    if plan.data.tokenizer.vocab_size > plan.model_config.vocab_size:
        raise AigcError(
            f"the dataset's tokenizer has {plan.data.tokenizer.vocab_size} tokens but the model only "
            f"{plan.model_config.vocab_size}; fine-tune only on data prepared with the run's tokenizer"
        )
    check_split_size(len(plan.data.val), "val", block)
    check_split_size(len(plan.data.train), "train", block, plan.train_config.batch_size * world_size)


def check_world_size(plan: SessionPlan, world_size: int) -> None:
    if world_size > 1:
        _check_sizes(plan, world_size)


def check_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber: an existing run needs --resume or --overwrite; a foreign folder is never touched.
    Everything --overwrite would delete is checked here, before anything is written."""
    if resume:
        if not (run_dir / STATE).is_file():
            raise AigcError(f"cannot resume {run_dir}: {STATE} is missing; start a new run with --overwrite instead")
        for name in RUN_ARTEFACTS:
            _refuse_link(run_dir / name, "resume would write through it")
        return
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise AigcError(f"--out {run_dir} is a file; choose a folder name")
    if (run_dir / CONFIG).is_file():
        if not overwrite:
            raise AigcError(
                f"{run_dir} already holds a run; continue it with --resume {run_dir} or replace it with --overwrite"
            )
        files_to_clear(run_dir)
    elif any(not is_stale_temp_file(path) for path in run_dir.iterdir()):  # temp files of a killed run: removed
        raise AigcError(f"{run_dir} exists and is not an aigc run; choose another --out (nothing was changed)")


def _refuse_link(path: Path, why: str) -> None:
    if path.is_symlink():
        raise AigcError(
            f"{path} is a symbolic link, which aigc did not make ({why}); remove the link or choose another "
            "run folder (nothing was changed)"
        )


def files_to_clear(run_dir: Path) -> list[Path]:
    """What `--overwrite` deletes, deepest first: the files aigc writes into a run and its own folders
    (removed only if nothing else is left in them). A symbolic link or an odd file type among them is
    an AigcError: nothing is deleted through a link, and nothing is deleted until all is checked."""
    doomed: list[Path] = []
    for name in RUN_ARTEFACTS:
        path = run_dir / name
        _refuse_link(path, "--overwrite never deletes through links")
        if not path.exists():
            continue
        is_folder = name in RUN_FOLDER_FILES
        if path.is_dir() != is_folder:
            kind = "folder" if is_folder else "file"
            raise AigcError(f"{path} is not a {kind} as aigc writes it; move it away first (nothing was changed)")
        if is_folder:
            for pattern in RUN_FOLDER_FILES[name]:
                for inner in sorted(path.glob(pattern)):
                    _refuse_link(inner, "--overwrite never deletes through links")
                    if inner.is_file():
                        doomed.append(inner)
        doomed.append(path)
    return doomed


def carry_chat_template(plan: SessionPlan) -> dict | None:
    """Give a new run the chat template it was trained for, and say where it came from (for config.json).

    Instruction data's template wins over the base's: the conversations were laid out by it, so it is
    the format the run learned (and `aigc prepare` took it from a run that may not be the base). Plain
    text teaches no format, so the base's (`--init-from`) is kept. A resumed run keeps what it has."""
    if plan.resume:
        return read_run_config(plan.run_dir).chat_template_source
    prepared_from = plan.data.info.get("options", {}).get("chat_template_from")
    candidates = [
        (plan.data.path, {"from": "instruction data", "path": str(plan.data.path)}),
        # Instruction data prepared before the dataset kept its template: the run it was rendered with.
        (prepared_from, {"from": "instruction data", "path": str(plan.data.path), "template_of": prepared_from}),
        (plan.init_from and resolve_run_dir(plan.init_from), {"from": "base", "path": str(plan.init_from)}),
    ]
    for folder, source in candidates:
        if folder and copy_chat_template(Path(folder), plan.run_dir):
            return source
    return None


def clear_run_dir(run_dir: Path) -> None:
    """Remove the artefacts of a previous run (only after every check has passed); files a user added
    to plots/, eval/ or tensorboard/ are kept, and so is the folder that holds them."""
    for path in files_to_clear(run_dir):
        if path.is_dir():
            if not any(path.iterdir()):
                path.rmdir()
        else:
            path.unlink()


def freeze_embeddings(model: nn.Module) -> None:
    """Fine-tuning option: keep token/position embeddings (and the tied output layer) fixed."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            module.weight.requires_grad_(False)


def token_byte_lengths(tokenizer: Tokenizer, vocab_size: int) -> np.ndarray:
    """(V,) bytes each token id stands for (0 for special tokens): the denominator of bits per byte."""
    lengths = np.zeros(vocab_size, dtype=np.int64)
    for token_id in range(tokenizer.vocab_size):
        lengths[token_id] = len(tokenizer.token_bytes(token_id))
    return lengths
