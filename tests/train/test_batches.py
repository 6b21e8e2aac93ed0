import numpy as np
import pytest
import torch

from aigc.errors import AigcError
from aigc.train.batches import BatchSampler, check_split_size, document_starts, eval_batches, fixed_windows

CPU = torch.device("cpu")


@pytest.fixture
def tokens():
    return np.arange(1000, dtype=np.uint16)


def test_sampler_targets_are_inputs_shifted_by_one(tokens):
    inputs, targets = BatchSampler(tokens, 16, 4, seed=0).next(CPU)
    assert inputs.shape == targets.shape == (4, 16)
    assert inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    assert int(targets.max()) < 1000


def test_sampler_state_round_trip_continues_the_same_stream(tokens):
    a = BatchSampler(tokens, 16, 4, seed=3)
    a.next(CPU)
    saved = a.state()
    expected = [a.next(CPU)[0] for _ in range(3)]
    b = BatchSampler(tokens, 16, 4, seed=99)
    b.set_state(saved)
    assert all(torch.equal(x, b.next(CPU)[0]) for x in expected)


def test_sampler_ranks_split_the_global_batch(tokens):
    whole = BatchSampler(tokens, 8, 6, seed=5).next(CPU)[0]
    halves = [BatchSampler(tokens, 8, 3, seed=5, rank=r, world_size=2).next(CPU)[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole)


def test_fixed_windows_cover_the_split_and_batch(tokens):
    starts = fixed_windows(tokens, 16, 10)
    assert starts[0] == 0 and starts[-1] == 1000 - 17
    batches = list(eval_batches(tokens, starts, 16, 4, CPU))
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(batches[1][0][0], torch.arange(starts[4], starts[4] + 16))


def test_check_split_size_names_the_split_and_the_fix():
    check_split_size(33, "val", 32)
    with pytest.raises(AigcError, match="val split has only 32 tokens.*smaller --batch-size or --block-size"):
        check_split_size(32, "val", 32)
    with pytest.raises(AigcError, match="train split"):
        check_split_size(100, "train", 32, windows=4)


def test_document_windows_open_documents_that_a_whole_window_fits_after(tokens):
    docs = np.array([[0, 100, 0], [100, 250, 1], [250, 990, 0], [990, 1000, 1]])
    starts = document_starts(docs, len(tokens), 16)
    assert starts.tolist() == [0, 99, 249]  # the token before each document; 989 + 16 + 1 run past the end
    sampler = BatchSampler(tokens, 16, 64, seed=0, starts=starts)
    firsts = {int(t) for _ in range(3) for t in sampler.next(CPU)[0][:, 0]}
    assert firsts == {0, 99, 249}


def test_document_windows_keep_to_learnable_starts_under_a_mask(tokens):
    mask = np.zeros(len(tokens), dtype=np.uint8)
    mask[120:130] = 1  # only a window over 120-130 has anything to learn
    docs = np.array([[0, 100, -1], [100, 500, -1], [500, 1000, -1]])
    sampler = BatchSampler(tokens, 32, 8, seed=0, mask=mask, starts=document_starts(docs, len(tokens), 32))
    assert {int(t) for t in sampler.next(CPU)[0][:, 0]} == {99}


def test_document_starts_refuses_when_no_document_fits_a_window(tokens):
    with pytest.raises(AigcError, match="--windows anywhere"):
        document_starts(np.array([[0, 1000, 0]])[:, :] + [[995, 0, 0]], len(tokens), 16)
