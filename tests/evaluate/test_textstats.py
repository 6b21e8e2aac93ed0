"""Diversity and degeneration metrics on hand-made texts whose answers can be counted by hand."""

import pytest

from aigc.evaluate.textstats import distinct_n, diversity_metrics, repeated_ngram_share, self_bleu, words


def test_words_splits_punctuation_and_cjk_characters():
    assert words("Great film, 10/10!") == ["great", "film", ",", "10", "/", "10", "!"]
    assert words("这部电影 good") == ["这", "部", "电", "影", "good"]


def test_distinct_n_counts_unique_over_pooled_ngrams():
    texts = ["a b a b", "a c"]  # words: a b a b | a c
    assert distinct_n(texts, 1) == pytest.approx(3 / 6)  # {a, b, c} of 6 words
    assert distinct_n(texts, 2) == pytest.approx(3 / 4)  # ab, ba, ab, ac -> {ab, ba, ac}
    assert distinct_n(["a"], 2) is None


def test_repeated_ngram_share_is_zero_without_repeats_and_high_for_loops():
    assert repeated_ngram_share("one two three four five") == 0.0
    loop = " ".join(["the film is bad"] * 5)  # 20 words, 17 4-grams, 4 distinct
    assert repeated_ngram_share(loop) == pytest.approx(1 - 4 / 17)
    assert repeated_ngram_share("too short") is None


def test_self_bleu_is_100_for_identical_samples_and_low_for_disjoint_ones():
    same = ["the cast is brilliant and the music superb"] * 3
    assert self_bleu(same) == pytest.approx(100.0)
    disjoint = ["alpha beta gamma delta", "one two three four", "red green blue black"]
    assert self_bleu(disjoint) < 1.0
    assert self_bleu(["only one"]) is None


def test_diversity_metrics_reports_length_and_end_of_text_share():
    result = diversity_metrics(["a b c d e", "f g h i j"], lengths=[10, 20], finished=[True, False])
    assert result["mean_length_tokens"] == 15
    assert result["ended_at_eot_share"] == 0.5
    assert result["distinct_1"] == 1.0
    assert result["num_samples"] == 2
