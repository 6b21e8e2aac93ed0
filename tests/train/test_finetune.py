"""Fine-tuning (`init_from`): a model pretrained on long reviews adapts to short, lower-case ones
(IMDb -> Rotten Tomatoes in miniature) faster than the same model trained from scratch."""

import random

import pytest

from aigc.errors import AigcError
from aigc.models import load_run
from aigc.tokenizer import Tokenizer
from aigc.train.loop import train
from conftest import tiny_train_config, write_dataset

_GOOD = ["a wonderful , moving story", "great acting and superb music", "funny and warm", "the cast is brilliant"]
_BAD = [
    "a boring , weak plot",
    "terrible acting and awful dialogue",
    "dull and far too long",
    "the ending makes no sense",
]


def short_reviews(n: int, seed: int = 1) -> list[tuple[str, str]]:
    """Rotten-Tomatoes-like snippets: lower case, spaced punctuation, one clause or two."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        parts = rng.sample(_GOOD if label == "pos" else _BAD, k=2)
        rows.append((f"{parts[0]} , {parts[1]} .", label))
    return rows


@pytest.fixture(scope="module")
def short_data(tmp_path_factory, tiny_tokenizer):
    return write_dataset(tmp_path_factory.mktemp("short") / "rt", tiny_tokenizer, short_reviews(240))


def test_finetune_beats_scratch_on_new_data(tiny_data, short_data, tiny_model, tmp_path):
    base = train(tiny_data, tmp_path / "base", tiny_model, tiny_train_config(max_steps=60, eval_every=60, batch_size=8))
    config = tiny_train_config(max_steps=12, eval_every=12, warmup_steps=0, learning_rate=1e-3)
    tuned = train(short_data, tmp_path / "tuned", train_config=config, init_from=base)
    scratch = train(short_data, tmp_path / "scratch", tiny_model, config)
    tuned_loss = load_run(tuned).metrics()[-1]["val_loss"]
    scratch_loss = load_run(scratch).metrics()[-1]["val_loss"]
    assert tuned_loss < scratch_loss - 0.3
    assert load_run(tuned).config.init_from == str(base)


def test_finetune_freeze_embeddings_keeps_them(tiny_data, short_data, tiny_model, tmp_path):
    import torch

    base = train(tiny_data, tmp_path / "base", tiny_model, tiny_train_config(max_steps=3))
    config = tiny_train_config(max_steps=3, freeze_embeddings=True)
    tuned = train(short_data, tmp_path / "tuned", train_config=config, init_from=base)
    before, after = load_run(base).model, load_run(tuned).model
    assert torch.equal(before.wte.weight, after.wte.weight)
    assert torch.equal(before.wpe.weight, after.wpe.weight)
    assert not torch.equal(before.h[0].mlp.c_fc.weight, after.h[0].mlp.c_fc.weight)


def test_finetune_rejects_data_with_another_tokenizer(tiny_data, tiny_model, tmp_path):
    base = train(tiny_data, tmp_path / "base", tiny_model, tiny_train_config(max_steps=3))
    rows = short_reviews(80)
    other = Tokenizer.train((t for t, _ in rows), vocab_size=300, labels=("pos", "neg"))
    data = write_dataset(tmp_path / "other", other, rows)
    with pytest.raises(AigcError, match=r"different tokenizer.*--tokenizer .*tokenizer.json"):
        train(data, tmp_path / "tuned", train_config=tiny_train_config(), init_from=base)
    assert not (tmp_path / "tuned").exists()
