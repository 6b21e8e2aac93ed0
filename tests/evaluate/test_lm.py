"""Sliding-window scoring gives the same per-token losses as one full forward pass."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aigc.evaluate.lm import _batches, _windows, score_sequences, summarize
from aigc.models import load_run


def test_windows_cover_every_target_once():
    for length in range(1, 30):
        for first in range(1, length + 1):
            for block in (1, 2, 5, 8):
                covered = [
                    p for w in _windows(0, length, first, block) for p in range(w.score_from, w.start + w.length + 1)
                ]
                assert covered == list(range(first, length))


def test_score_sequences_matches_direct_forward(make_run):
    run = load_run(make_run("gpt"))  # block_size 64
    rng = np.random.default_rng(0)
    sequences = [rng.integers(0, 300, size=n).tolist() for n in (40, 9, 60)]
    scores = score_sequences(run.model, sequences, [1, 1, 5], block_size=64, batch_size=2)
    for seq, first, (targets, nll, correct) in zip(sequences, [1, 1, 5], scores):
        x = torch.tensor([seq])
        with torch.no_grad():
            logits, _ = run.model(x[:, :-1])
        expected = F.cross_entropy(logits[0], x[0, 1:], reduction="none")[first - 1 :]
        assert targets.tolist() == seq[first:]
        assert np.allclose(nll, expected.numpy(), atol=1e-4)
        assert correct.tolist() == (logits[0].argmax(-1) == x[0, 1:])[first - 1 :].tolist()


def test_a_token_cap_splits_batches_without_changing_scores(make_run):
    run = load_run(make_run("gpt"))
    rng = np.random.default_rng(1)
    sequences = [rng.integers(0, 300, size=n).tolist() for n in (5, 6, 7, 60, 8)]
    windows = sorted((w for k, s in enumerate(sequences) for w in _windows(k, len(s), 1, 64)), key=lambda w: w.length)
    batches = _batches(windows, batch_size=16, max_tokens=40)
    assert [[w.length for w in b] for b in batches] == [[4, 5, 6, 7], [59]]  # 5 rows x 59 would pass 40
    capped = score_sequences(run.model, sequences, [1] * 5, block_size=64, batch_size=16, max_batch_tokens=40)
    whole = score_sequences(run.model, sequences, [1] * 5, block_size=64, batch_size=16, max_batch_tokens=10**6)
    for (t1, n1, c1), (t2, n2, c2) in zip(capped, whole):
        assert t1.tolist() == t2.tolist() and c1.tolist() == c2.tolist()
        assert np.allclose(n1, n2, atol=1e-5)


def test_score_sequences_windows_long_sequences_for_lstm_too(make_run):
    run = load_run(make_run("lstm", name="lstm"))
    seq = list(range(1, 150))  # longer than the 64-token block
    ((targets, nll, _),) = score_sequences(run.model, [seq], [1], block_size=64)
    assert len(targets) == len(nll) == 148 and np.isfinite(nll).all()


def test_summarize_pools_tokens_and_bytes():
    scores = [
        (np.array([1, 2]), np.array([1.0, 3.0]), np.array([True, False])),
        (np.array([3]), np.array([2.0]), np.array([True])),
    ]
    token_bytes = np.array([0, 1, 2, 3])
    result = summarize(scores, token_bytes)
    assert result["loss"] == pytest.approx(2.0)
    assert result["perplexity"] == pytest.approx(math.exp(2.0))
    assert result["bits_per_byte"] == pytest.approx(6.0 / math.log(2) / 6)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert summarize([], token_bytes)["loss"] is None
