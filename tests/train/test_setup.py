"""Where training windows start (`setup.window_starts`): at documents for labelled data by default."""

from types import SimpleNamespace

import numpy as np
import pytest
from tests.train.conftest import write_dataset

from aigc.artifacts.dataset import open_dataset
from aigc.config import TrainConfig
from aigc.errors import AigcError
from aigc.train import setup


def _plan(data, windows: str, seq_len: int = 16):
    return SimpleNamespace(train_config=TrainConfig(windows=windows), data=data, seq_len=seq_len)


def test_auto_opens_labelled_documents_so_every_window_starts_with_a_control_token(tiny_data):
    data = open_dataset(tiny_data)
    starts = setup.window_starts(_plan(data, "auto"))
    assert starts is not None and len(starts) > 10
    label_ids = {data.tokenizer.label_id(label) for label in data.tokenizer.labels}
    # As a generation's prompt: the end-of-text before the document (none before the first), its label.
    assert {int(data.train.tokens[s]) for s in starts[1:]} == {data.tokenizer.eot_id}
    assert {int(data.train.tokens[s + 1]) for s in starts[1:]} == label_ids
    assert starts[0] == 0 and int(data.train.tokens[0]) in label_ids


def test_anywhere_leaves_windows_to_random_offsets(tiny_data):
    assert setup.window_starts(_plan(open_dataset(tiny_data), "anywhere")) is None


def test_auto_keeps_random_offsets_for_unlabelled_text(tmp_path, tiny_tokenizer, reviews):
    folder = write_dataset(tmp_path / "plain", tiny_tokenizer, [(text, None) for text, _ in reviews])
    data = open_dataset(folder)
    assert setup.window_starts(_plan(data, "auto")) is None
    starts = setup.window_starts(_plan(data, "documents"))  # asked for: every document's start
    assert np.array_equal(starts[1:], data.train.docs[1 : len(starts), 0] - 1)


def test_windows_choice_is_checked():
    with pytest.raises(AigcError, match="--windows"):
        TrainConfig(windows="sometimes")
