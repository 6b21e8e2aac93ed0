"""The n-gram index finds exact verbatim spans, never inflated by hash collisions."""

import numpy as np
import pytest

from aigc.errors import AigcError
from aigc.evaluate.memorise import NgramIndex, memorisation_metrics, window_hashes


def _brute_longest(train: np.ndarray, sample: np.ndarray, n: int) -> int:
    """Longest sample substring found in train, by direct search (spans under n count as 0)."""
    haystack = "," + ",".join(map(str, train.tolist())) + ","
    best = 0
    for i in range(len(sample)):
        for j in range(i + best + 1, len(sample) + 1):
            if "," + ",".join(map(str, sample[i:j].tolist())) + "," not in haystack:
                break
            best = j - i
    return best if best >= n else 0


def test_window_hashes_equal_for_equal_windows_only():
    tokens = np.array([1, 2, 3, 1, 2, 3, 4], dtype=np.uint16)
    hashes = window_hashes(tokens, 3)
    assert len(hashes) == 5
    assert hashes[0] == hashes[3] and len(set(hashes.tolist())) == 4
    assert len(window_hashes(tokens[:2], 3)) == 0


def test_longest_span_finds_planted_copy_on_crafted_corpus():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 50, size=5000).astype(np.uint16)
    index = NgramIndex(train, n=8)
    sample = np.concatenate([[60, 61, 62], train[1234:1274], [63, 64]])  # 60+ never occur in train
    assert index.longest_span(sample) == 40
    assert index.longest_span([60, 61, 62, 63, 64, 65, 66, 67, 68]) == 0
    assert index.longest_span([1, 2]) == 0  # shorter than n


def test_longest_span_matches_brute_force_on_random_samples():
    rng = np.random.default_rng(1)
    train = rng.integers(0, 6, size=3000).astype(np.uint16)  # tiny alphabet: many partial matches
    index = NgramIndex(train, n=4)
    for _ in range(60):
        sample = rng.integers(0, 6, size=int(rng.integers(1, 40)))
        assert index.longest_span(sample) == _brute_longest(train, sample, 4)


def test_longest_span_joins_no_two_separate_matches():
    # Every 3-gram of 1..7 occurs in train, but 1 2 3 4 5 and 3 4 5 6 7 sit in different places:
    # the hit windows chain into one run, yet no 7-token span exists.
    train = np.array([1, 2, 3, 4, 5, 0, 0, 3, 4, 5, 6, 7], dtype=np.uint16)
    index = NgramIndex(train, n=3)
    assert index.longest_span([1, 2, 3, 4, 5, 6, 7]) == 5


def test_memorisation_metrics_share_uses_min_span():
    rng = np.random.default_rng(2)
    train = rng.integers(0, 1000, size=4000).astype(np.uint16)
    index = NgramIndex(train, n=8)
    samples = [train[100:140].tolist(), train[500:510].tolist(), [1001] * 20]
    result = memorisation_metrics(index, samples, min_span=32)
    assert result["longest_span_per_sample"] == [40, 10, 0]
    assert result["share_with_min_span"] == pytest.approx(1 / 3)
    assert result["max_longest_span"] == 40
    with pytest.raises(AigcError, match="min-span"):
        memorisation_metrics(index, samples, min_span=4)
