import random

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from aigc.errors import AigcError
from aigc.tokenizer import EOT, PAD, Tokenizer, text_pieces


@pytest.mark.parametrize(
    "text",
    ["plain English.", "中文文本，标点！", "emoji 🎬🍿 and ZWJ 👩‍💻", "  spaces\n\ttabs  ", "Ünïcödé ñ", ""],
)
def test_tokenizer_round_trips_any_unicode(tiny_tokenizer, text):
    assert tiny_tokenizer.decode(tiny_tokenizer.encode(text)) == text


def test_tokenizer_token_bytes_rebuild_text(tiny_tokenizer):
    text = "Rated 7/10 — 很好 🎉"
    ids = tiny_tokenizer.encode(text)
    assert b"".join(tiny_tokenizer.token_bytes(i) for i in ids).decode("utf-8") == text


def test_tokenizer_knows_specials_and_labels(tiny_tokenizer):
    assert tiny_tokenizer.labels == ("pos", "neg")
    assert tiny_tokenizer.is_special(tiny_tokenizer.eot_id)
    assert tiny_tokenizer.label_id("pos") != tiny_tokenizer.label_id("neg")
    with pytest.raises(AigcError, match="pos, neg"):
        tiny_tokenizer.label_id("neutral")


def test_tokenizer_save_load_same_ids(tiny_tokenizer, tmp_path):
    tiny_tokenizer.save(tmp_path / "tok.json")
    loaded = Tokenizer.load(tmp_path / "tok.json")
    text = "a wonderful film 非常好看"
    assert loaded.encode(text) == tiny_tokenizer.encode(text)
    assert loaded.vocab_fingerprint() == tiny_tokenizer.vocab_fingerprint()


def test_tokenizer_rejects_vocab_smaller_than_bytes():
    with pytest.raises(AigcError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=100)


def tokenizer_with_digit_splitting(texts: list[str]) -> Tokenizer:
    """A byte-level BPE whose pre-tokenizer first splits digits apart (SmolLM2's arrangement)."""
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOT, PAD], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    hf.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(hf, labels=())


def test_digit_splitting_tokenizers_encode_long_text_in_pieces_with_the_same_ids():
    rng = random.Random(1)
    alphabet = ["a", "b", "7", "42", " ", "  ", "\n", "été", "猫", ".", "'s", "\t", "0.5"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(50, 400))) for _ in range(200)]
    tokenizer = tokenizer_with_digit_splitting(texts)
    assert tokenizer.splits_safely
    for text in texts:
        pieces = [i for piece in text_pieces(text, size=16) for i in tokenizer.encode(piece)]
        assert pieces == tokenizer.encode(text)
