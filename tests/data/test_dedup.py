import numpy as np
import pytest

from aigc.data.dedup import ExactDedup, MinHasher, near_duplicates, normalised_key

BASE = (
    "The film opens on a rainy night in a small harbour town where an old fisherman tells his grandson "
    "about the storm that took his boat, and the story moves slowly between memory and the present day "
    "until the two finally sail out together at dawn."
)


def test_exact_dedup_ignores_case_and_whitespace():
    dedup = ExactDedup()
    assert not dedup.is_duplicate("Hello  World\nagain")
    assert dedup.is_duplicate("hello world again")
    assert not dedup.is_duplicate("hello world, again")
    assert normalised_key("A b") == normalised_key("a\tB")


def test_minhash_signatures_estimate_jaccard():
    hasher = MinHasher()
    edited = BASE.replace("rainy", "stormy")
    other = "A loud action comedy about two cops, a stolen car and far too many explosions in Miami."
    sigs = hasher.signatures([BASE, edited, other, BASE.upper()])
    assert sigs.shape == (4, hasher.num_perm) and sigs.dtype == np.uint32
    agree = lambda i, j: np.mean(sigs[i] == sigs[j])  # noqa: E731
    assert agree(0, 3) == 1.0  # case does not matter
    assert agree(0, 1) > 0.8
    assert agree(0, 2) < 0.2


def test_minhash_signatures_do_not_depend_on_batching():
    hasher = MinHasher()
    texts = [BASE, "short one here ok", "中文的电影评论非常好看", "x"]
    together = hasher.signatures(texts)
    alone = np.concatenate([hasher.signatures([t]) for t in texts])
    assert np.array_equal(together, alone)


def test_minhash_marks_texts_too_short_to_shingle():
    sigs = MinHasher().signatures(["two words", "three words here"])
    assert (sigs[0] == np.iinfo(np.uint32).max).all()
    assert not (sigs[1] == np.iinfo(np.uint32).max).all()


def test_near_duplicates_keep_first_copy_only():
    texts = [
        BASE,
        "Totally unrelated: a documentary on bees, their hives and the farmers who keep them through winter.",
        BASE.replace("grandson", "granddaughter"),
        BASE + " A must see.",
        "tiny",
    ]
    duplicate = near_duplicates(MinHasher().signatures(texts), threshold=0.8)
    assert duplicate.tolist() == [False, False, True, True, False]


def test_near_duplicates_threshold_one_keeps_edited_copies():
    texts = [BASE, BASE.replace("grandson", "granddaughter"), BASE]
    duplicate = near_duplicates(MinHasher().signatures(texts), threshold=1.0)
    assert duplicate.tolist() == [False, False, True]


def test_near_duplicates_chinese_text_shingles_by_character():
    text = "这部电影讲述了一个渔夫和他的孙子在暴风雨之后重新出海的故事，画面很美，音乐也很动人。"
    texts = [text, text.replace("很美", "漂亮"), "完全不同的一部科幻动作片，节奏很快，特效很多。"]
    duplicate = near_duplicates(MinHasher().signatures(texts), threshold=0.7)
    assert duplicate.tolist() == [False, True, False]


@pytest.mark.parametrize("count", [2000])
def test_near_duplicates_scale_linearly_with_distinct_documents(count):
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choice(words, size=40)) for _ in range(count)]
    sigs = MinHasher().signatures(texts)
    assert not near_duplicates(sigs, threshold=0.8).any()


def _datasketch_reference(signatures, threshold):
    """The plain datasketch loop (every document queried and indexed), for comparison."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=signatures.shape[1])
    duplicate = []
    for i, row in enumerate(signatures):
        sketch = LeanMinHash(seed=1, hashvalues=row, scheme="affine32")
        hit = any(np.mean(signatures[c] == row) >= threshold for c in lsh.query(sketch))
        duplicate.append(hit)
        if not hit:
            lsh.insert(i, sketch)
    return np.array(duplicate)


def test_near_duplicates_band_prefilter_matches_plain_datasketch():
    rng = np.random.default_rng(3)
    words = [f"w{i}" for i in range(3000)]
    bases = [list(rng.choice(words, size=60)) for _ in range(40)]
    texts = []
    for _ in range(400):  # each text: a random base with 0-2 words replaced
        text = list(bases[rng.integers(len(bases))])
        for position in rng.choice(60, size=rng.integers(0, 3), replace=False):
            text[position] = str(rng.choice(words))
        texts.append(" ".join(text))
    signatures = MinHasher().signatures(texts)
    ours = near_duplicates(signatures, threshold=0.8)
    assert 100 < ours.sum() < 400  # the corpus really holds near duplicates
    assert np.array_equal(ours, _datasketch_reference(signatures, 0.8))
