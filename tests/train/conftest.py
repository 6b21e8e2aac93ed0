"""Tiny prepared datasets for training tests, written through `aigc.artifacts.dataset` (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aigc.artifacts.dataset import token_dtype, write_split
from aigc.config import TrainConfig, model_preset
from aigc.tokenizer import Tokenizer


def write_dataset(folder: Path, tokenizer: Tokenizer, rows: list[tuple[str, str | None]], val_every: int = 8) -> Path:
    """A prepared-dataset folder: every `val_every`-th document goes to val, the rest to train."""
    folder.mkdir(parents=True, exist_ok=True)
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], [])}
    labels = list(tokenizer.labels)
    for i, (text, label) in enumerate(rows):
        prefix = [tokenizer.label_id(label)] if label is not None else []
        ids = prefix + tokenizer.encode(text) + [tokenizer.eot_id]
        docs, label_ids = splits["val" if i % val_every == 0 else "train"]
        docs.append(ids)
        label_ids.append(labels.index(label) if label is not None else -1)
    counts = {name: write_split(folder, name, docs, ids, tokenizer.vocab_size) for name, (docs, ids) in splits.items()}
    tokenizer.save(folder / "tokenizer.json")
    info = {
        "source": "synthetic",
        "labels": labels,
        "vocab_size": tokenizer.vocab_size,
        "token_dtype": token_dtype(tokenizer.vocab_size).name,
        "tokens": {name: c["tokens"] for name, c in counts.items()},
        "tokenizer_fingerprint": tokenizer.vocab_fingerprint(),
    }
    (folder / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_tokenizer, reviews) -> Path:
    """The shared synthetic reviews, tokenised with the tiny tokenizer (read-only for tests)."""
    return write_dataset(tmp_path_factory.mktemp("data") / "reviews", tiny_tokenizer, reviews)


@pytest.fixture
def tiny_model(tiny_tokenizer):
    """The `tiny` GPT preset, shrunk further so a few steps take milliseconds."""
    return model_preset("tiny", block_size=32, vocab_size=tiny_tokenizer.vocab_size)


def tiny_train_config(**overrides) -> TrainConfig:
    base = dict(
        batch_size=4, max_steps=6, eval_every=3, eval_batches=2, warmup_steps=2, learning_rate=3e-3, sample_tokens=0
    )
    return TrainConfig(**{**base, **overrides})
