import json

import numpy as np
import pytest
from tests.conftest import write_csv as _csv

from aigc.artifacts.dataset import open_split
from aigc.config import PrepareConfig
from aigc.data.clean import clean_text
from aigc.data.prepare import assign_splits, prepare_dataset
from aigc.errors import AigcError
from aigc.tokenizer import Tokenizer

REQUIRED_KEYS = {
    "source",
    "source_sha256",
    "options",
    "counts",
    "splits",
    "bytes_per_token",
    "labels",
    "label_distribution",
    "vocab_size",
    "token_dtype",
    "tokenizer_fingerprint",
    "elapsed_s",
}


def _config(**options):
    return PrepareConfig(**{"label_column": "label", "vocab_size": 400, "near_dup_threshold": 1.0, **options})


def _texts(folder, split):
    tokenizer = Tokenizer.load(folder / "tokenizer.json")
    data = open_split(folder, split)
    return [tokenizer.decode(data.document(i).tolist()) for i in range(len(data.docs))], data, tokenizer


def test_prepare_dataset_writes_the_documented_folder(tmp_path, reviews):
    info = prepare_dataset(_csv(tmp_path / "r.csv", reviews), tmp_path / "ds", _config())
    assert REQUIRED_KEYS <= set(info)
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text()) == info
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == [
        "dataset.json",
        "tokenizer.json",
        "train.bin",
        "train.docs.npy",
        "val.bin",
        "val.docs.npy",
    ]
    assert info["labels"] == ["neg", "pos"] and info["token_dtype"] == "uint16"
    assert info["counts"]["split"] == {"train": 190, "val": 10}
    assert sum(info["label_distribution"].values()) == 200
    assert info["tokenizer_fingerprint"] == Tokenizer.load(tmp_path / "ds" / "tokenizer.json").vocab_fingerprint()


def test_prepare_dataset_frames_documents_with_label_and_end_of_text(tmp_path, reviews):
    prepare_dataset(_csv(tmp_path / "r.csv", reviews), tmp_path / "ds", _config())
    texts, data, tokenizer = _texts(tmp_path / "ds", "train")
    by_text = dict(reviews)
    for i, text in enumerate(texts):
        ids = data.document(i)
        label = ["neg", "pos"][data.docs[i, 2]]
        assert by_text[text] == label
        assert ids[0] == tokenizer.label_id(label) and ids[-1] == tokenizer.eot_id
    assert data.docs[0, 0] == 0 and (data.docs[1:, 0] == data.docs[:-1, 1]).all()


def test_prepare_dataset_round_trips_unicode_text(tmp_path):
    docs = [
        "这部电影非常好看，演员的表演很精彩！",
        "emoji 🎬🍿 and ZWJ 👩‍💻 family 👨‍👩‍👧",
        "Ünïcödé ñ — «quotes» ½ ∑",
    ] * 1
    docs += [f"filler document number {i} with ordinary words" for i in range(20)]
    source = tmp_path / "u.txt"
    source.write_text("\n\n".join(docs), encoding="utf-8")
    prepare_dataset(str(source), tmp_path / "ds", PrepareConfig(vocab_size=300, val_fraction=0.0, dedup=False))
    texts, _, _ = _texts(tmp_path / "ds", "train")
    assert texts == [clean_text(d) for d in docs]


def test_prepare_dataset_split_is_deterministic_by_seed(tmp_path, reviews):
    source = _csv(tmp_path / "r.csv", reviews)
    prepare_dataset(source, tmp_path / "a", _config(seed=1, test_fraction=0.1))
    prepare_dataset(source, tmp_path / "b", _config(seed=1, test_fraction=0.1))
    prepare_dataset(source, tmp_path / "c", _config(seed=2, test_fraction=0.1))
    val = {name: _texts(tmp_path / name, "val")[0] for name in "abc"}
    assert val["a"] == val["b"] and val["a"] != val["c"]
    all_docs = [t for split in ("train", "val", "test") for t in _texts(tmp_path / "a", split)[0]]
    assert sorted(all_docs) == sorted(text for text, _ in reviews)  # every document in exactly one split
    assert (len(_texts(tmp_path / "a", "test")[0]), len(val["a"])) == (20, 10)


def test_assign_splits_keeps_at_least_one_document_per_requested_split():
    assignment = assign_splits(3, PrepareConfig(val_fraction=0.01, test_fraction=0.01))
    assert sorted(assignment.tolist()) == [0, 1, 2]
    with pytest.raises(AigcError, match="only 2 documents remain.*lower --val-fraction"):
        assign_splits(2, PrepareConfig(val_fraction=0.01, test_fraction=0.01))


def test_prepare_dataset_reports_counts_of_each_step(tmp_path):
    rows = [
        ("A quiet drama about a family farm, told over one long summer with care.", "pos"),
        ("a quiet drama about a family   farm, told over one long summer with care.", "pos"),  # exact dup
        ("Write to me at someone@example.com, or call (555) 123-4567 about this dull film.", "neg"),
        ("x", "neg"),  # too short
        ("A <b>loud</b> heist movie with car chases, a twist you can see coming, and a bland hero.", "neg"),
        ("A loud heist movie with car chases, a twist you can see coming, and a bland hero!", "neg"),  # near dup
    ]
    info = prepare_dataset(
        _csv(tmp_path / "r.csv", rows), tmp_path / "ds", _config(min_chars=5, near_dup_threshold=0.7)
    )
    counts = info["counts"]
    assert counts["read"]["documents"] == 6
    assert (counts["clean"]["too_short"], counts["clean"]["kept"]) == (1, 5)
    assert (counts["dedup"]["exact"], counts["dedup"]["near"]) == (1, 1)
    assert (counts["redact"]["EMAIL"], counts["redact"]["PHONE"], counts["redact"]["documents"]) == (1, 1, 1)
    texts = [t for split in ("train", "val") for t in _texts(tmp_path / "ds", split)[0]]
    assert any("<EMAIL>" in t and "<PHONE>" in t for t in texts)
    assert not any("someone@example.com" in t for t in texts)


def test_prepare_dataset_no_redact_keeps_personal_data(tmp_path, reviews):
    rows = reviews[:40] + [("mail someone@example.com please, it is a fine film", "pos")]
    info = prepare_dataset(_csv(tmp_path / "r.csv", rows), tmp_path / "ds", _config(redact=False, val_fraction=0.0))
    assert info["counts"]["redact"] == {"enabled": False}
    assert any("someone@example.com" in t for t in _texts(tmp_path / "ds", "train")[0])


def test_prepare_dataset_reuses_the_same_dataset(tmp_path, reviews):
    source = _csv(tmp_path / "r.csv", reviews)
    first = prepare_dataset(source, tmp_path / "ds", _config())
    before = (tmp_path / "ds" / "train.bin").stat().st_mtime_ns
    messages = []
    again = prepare_dataset(source, tmp_path / "ds", _config(), progress=messages.append)
    assert again == first and (tmp_path / "ds" / "train.bin").stat().st_mtime_ns == before
    assert "reusing" in messages[0]


def test_prepare_dataset_refuses_a_different_dataset_unless_overwrite(tmp_path, reviews):
    source = _csv(tmp_path / "r.csv", reviews)
    prepare_dataset(source, tmp_path / "ds", _config())
    with pytest.raises(AigcError, match="already holds a different dataset.*--overwrite"):
        prepare_dataset(source, tmp_path / "ds", _config(seed=7))
    info = prepare_dataset(source, tmp_path / "ds", _config(seed=7, overwrite=True))
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["options"]["seed"] == 7 == info["options"]["seed"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_prepare_dataset_failure_leaves_old_dataset_intact(tmp_path, reviews):
    source = _csv(tmp_path / "r.csv", reviews)
    prepare_dataset(source, tmp_path / "ds", _config())
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    with pytest.raises(AigcError, match="too small"):
        prepare_dataset(source, tmp_path / "ds", _config(vocab_size=260, overwrite=True))
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "r.csv"]  # no temp folder left behind


def test_prepare_dataset_refuses_a_folder_that_is_not_a_dataset(tmp_path, reviews):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(AigcError, match="not empty and holds no dataset"):
        prepare_dataset(_csv(tmp_path / "r.csv", reviews), tmp_path / "mine", _config(overwrite=True))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


@pytest.mark.parametrize(
    "rows, options, message",
    [
        ([("good film", "pos"), ("bad film", "pos")], {}, "single value .'pos'.*2 or more values"),
        ([(f"review {i}", f"c{i}") for i in range(300)], {}, "more than 256 distinct values"),
        ([("good film", "very good"), ("bad film", "bad")], {}, "label value 'very good'.*cannot name a control token"),
        ([("good film", "endoftext"), ("bad film", "bad")], {}, "label value 'endoftext'"),
        (
            [("good film", "pos"), ("bad film", "neg")],
            {"vocab_size": 200},
            "--vocab-size 200 is too small.*at least 261",
        ),
        ([("", "pos"), ("   ", "neg")], {}, "empty after cleaning.*--text-column"),
    ],
)
def test_prepare_dataset_rejects_bad_corpora(tmp_path, rows, options, message):
    with pytest.raises(AigcError, match=message):
        prepare_dataset(_csv(tmp_path / "r.csv", rows), tmp_path / "ds", _config(**options))
    assert not (tmp_path / "ds").exists()


def test_prepare_dataset_label_column_needs_a_tabular_source(tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    with pytest.raises(AigcError, match="--label-column needs a CSV"):
        prepare_dataset(str(tmp_path / "a.txt"), tmp_path / "ds", _config())


def test_prepare_dataset_reuses_a_given_tokenizer(tmp_path, reviews, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tok.json")
    info = prepare_dataset(
        _csv(tmp_path / "r.csv", reviews[:60]), tmp_path / "ds", _config(tokenizer=str(tmp_path / "tok.json"))
    )
    assert info["tokenizer_fingerprint"] == tiny_tokenizer.vocab_fingerprint()
    assert info["vocab_size"] == tiny_tokenizer.vocab_size
    data = open_split(tmp_path / "ds", "train")
    assert data.tokens[0] in (tiny_tokenizer.label_id("pos"), tiny_tokenizer.label_id("neg"))


def test_prepare_dataset_appends_control_tokens_the_given_tokenizer_lacks(tmp_path, reviews, tiny_tokenizer):
    tiny_tokenizer.save(tmp_path / "tok.json")
    rows = [(text, "meh" if i % 3 == 0 else label) for i, (text, label) in enumerate(reviews[:30])]
    info = prepare_dataset(
        _csv(tmp_path / "r.csv", rows), tmp_path / "ds", _config(tokenizer=str(tmp_path / "tok.json"))
    )
    base_size = tiny_tokenizer.vocab_size
    assert info["vocab_size"] == base_size + 1 and info["base_vocab_size"] == base_size
    assert info["base_tokenizer_fingerprint"] == tiny_tokenizer.vocab_fingerprint()
    extended = Tokenizer.load(tmp_path / "ds" / "tokenizer.json", info["labels"])
    assert extended.label_id("meh") == base_size  # appended: every id of the base keeps its meaning
    assert extended.hf.get_vocab() | tiny_tokenizer.hf.get_vocab() == extended.hf.get_vocab()
    data = open_split(tmp_path / "ds", "train")
    meh = data.docs[data.docs[:, 2] == info["labels"].index("meh")]
    assert len(meh) and all(data.tokens[start] == base_size for start in meh[:, 0])


def test_prepare_dataset_uint32_shards_for_a_vocabulary_over_65536(tmp_path, reviews):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    from aigc.tokenizer import EOT, PAD

    # A word-level vocabulary of 70,000 entries: ids beyond uint16 occur in the text.
    words = sorted({w for text, _ in reviews[:40] for w in text.split()})
    vocab = {f"filler{i}": i for i in range(70_000 - len(words))}
    vocab.update({w: len(vocab) + i for i, w in enumerate(words)})
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="filler0"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens([EOT, PAD])
    Tokenizer(hf).save(tmp_path / "big.json")
    info = prepare_dataset(
        _csv(tmp_path / "r.csv", reviews[:40]), tmp_path / "ds", _config(tokenizer=str(tmp_path / "big.json"))
    )
    assert info["token_dtype"] == "uint32" and info["vocab_size"] > 65_536
    data = open_split(tmp_path / "ds", "train")
    assert data.tokens.dtype == np.uint32 and int(data.tokens.max()) >= 65_536
    tokenizer = Tokenizer.load(tmp_path / "ds" / "tokenizer.json", info["labels"])
    first = data.document(0)
    assert tokenizer.decode(first[1:-1].tolist()) in {text for text, _ in reviews[:40]}


def test_prepare_dataset_unlabelled_documents_have_label_index_minus_one(tmp_path):
    (tmp_path / "c.txt").write_text("\n\n".join(f"paragraph {i} about a film" for i in range(30)))
    info = prepare_dataset(str(tmp_path / "c.txt"), tmp_path / "ds", PrepareConfig(vocab_size=300, dedup=False))
    assert info["labels"] == [] and info["label_distribution"] == {}
    assert (open_split(tmp_path / "ds", "train").docs[:, 2] == -1).all()
    assert np.isclose(
        info["bytes_per_token"],
        sum(s["bytes"] for s in info["splits"].values()) / sum(s["tokens"] for s in info["splits"].values()),
        atol=1e-3,
    )


def test_prepare_dataset_publishes_with_umask_permissions(tmp_path, reviews):
    import os

    umask = os.umask(0o022)
    try:
        prepare_dataset(_csv(tmp_path / "r.csv", reviews[:40]), tmp_path / "ds", _config(val_fraction=0.0))
    finally:
        os.umask(umask)
    assert (tmp_path / "ds").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "ds").iterdir()} == {0o644}
