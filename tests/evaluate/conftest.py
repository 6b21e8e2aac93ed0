"""A tiny labelled dataset folder written with `artifacts.dataset.write_split` (no prepare step needed)."""

from __future__ import annotations

import json

import pytest

from aigc.artifacts.dataset import write_split


def _write_dataset(folder, tokenizer, reviews, *, labelled: bool = True) -> None:
    """train / val / test splits of `reviews` in the prepared-dataset format."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ["pos", "neg"] if labelled else []
    parts = {"train": reviews[:160], "val": reviews[160:190], "test": reviews[190:]}
    for split, rows in parts.items():
        docs, labels = [], []
        for text, label in rows:
            prefix = [tokenizer.label_id(label)] if labelled else []
            docs.append(prefix + tokenizer.encode(text) + [tokenizer.eot_id])
            labels.append(names.index(label) if labelled else -1)
        write_split(folder, split, docs, labels, tokenizer.vocab_size)
    info = {"labels": names, "token_dtype": "uint16", "tokenizer_fingerprint": tokenizer.vocab_fingerprint()}
    (folder / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    tokenizer.save(folder / "tokenizer.json")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_tokenizer, reviews):
    folder = tmp_path_factory.mktemp("data") / "tiny"
    _write_dataset(folder, tiny_tokenizer, reviews)
    return folder


@pytest.fixture
def write_dataset():
    """Factory: write a dataset folder of (text, label) rows, labelled or not."""
    return _write_dataset


def _save_tiny_run(folder, tokenizer, *, kind: str = "gpt", data=None, seed: int = 0):
    """A random-weight tiny run whose config.json records `data` as its dataset (when given)."""
    import torch

    from aigc.artifacts.run import RunConfig, save_run
    from aigc.config import model_preset
    from aigc.models import build_model

    torch.manual_seed(seed)
    config = model_preset("tiny", kind=kind, vocab_size=tokenizer.vocab_size)
    provenance = {"labels": list(tokenizer.labels)}
    if data is not None:
        provenance["path"] = str(data)
    return save_run(folder, RunConfig(model=config, data=provenance), tokenizer, build_model(config))


@pytest.fixture(scope="session")
def save_tiny_run():
    """Factory: save a random-weight tiny run, optionally recording its dataset path."""
    return _save_tiny_run


@pytest.fixture(scope="session")
def fast():
    """`aigc eval` options small enough that one evaluation of a tiny run takes about a second."""
    return ["--samples", "3", "--prompts", "4", "--prompt-tokens", "6", "--max-new-tokens", "12", "--lm-docs", "12"]
