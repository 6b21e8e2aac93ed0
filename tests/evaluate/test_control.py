"""The control classifier learns the train labels and scores samples per requested label."""

import numpy as np
import pytest

from aigc.artifacts.dataset import open_split
from aigc.errors import AigcError
from aigc.evaluate.control import (
    classifier_accuracy,
    control_accuracy,
    labelled_texts,
    train_classifier,
)


def test_labelled_texts_strip_control_tokens_and_keep_labels(tiny_dataset, tiny_tokenizer, reviews):
    texts, labels = labelled_texts(open_split(tiny_dataset, "val"), tiny_tokenizer)
    assert texts[0] == reviews[160][0]  # decoded text without <|pos|> or <|endoftext|>
    assert labels.tolist() == [0 if label == "pos" else 1 for _, label in reviews[160:190]]
    some, _ = labelled_texts(open_split(tiny_dataset, "train"), tiny_tokenizer, max_docs=7, seed=3)
    assert len(some) == 7


def test_classifier_separates_labels_and_scores_samples(tiny_dataset, tiny_tokenizer):
    texts, labels = labelled_texts(open_split(tiny_dataset, "train"), tiny_tokenizer)
    classifier = train_classifier(texts, labels, ["pos", "neg"])
    held, held_labels = labelled_texts(open_split(tiny_dataset, "val"), tiny_tokenizer)
    assert classifier_accuracy(classifier, held, held_labels) >= 0.9
    samples = [
        "a wonderful film, brilliant cast and superb music",
        "a boring film with terrible acting",
        "awful dialogue, dull and far too long",
    ]
    result = control_accuracy(classifier, samples, ["pos", "pos", "neg"])
    assert result["per_label"]["pos"] == {
        "accuracy": 0.5,
        "mean_probability": pytest.approx(np.mean(result["sample_probabilities"][:2])),
        "num_samples": 2,
    }
    assert result["per_label"]["neg"]["accuracy"] == 1.0
    assert result["accuracy"] == pytest.approx(2 / 3)


def test_train_classifier_needs_two_labels():
    with pytest.raises(AigcError, match="at least two"):
        train_classifier(["good", "fine"], np.array([0, 0]), ["pos", "neg"])
