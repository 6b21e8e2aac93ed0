"""A tiny labelled dataset folder written with `data.shards.write_split` (no prepare step needed)."""

from __future__ import annotations

import json

import pytest

from aigc.data.shards import write_split


def write_dataset(folder, tokenizer, reviews, *, labelled: bool = True) -> None:
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


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_tokenizer, reviews):
    folder = tmp_path_factory.mktemp("data") / "tiny"
    write_dataset(folder, tiny_tokenizer, reviews)
    return folder
