import pytest

from aigc.errors import AigcError
from aigc.tokenizer import Tokenizer


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
