"""Control accuracy: does text generated with `--label pos` read as positive?

A scikit-learn TF-IDF + logistic-regression classifier is trained on the train split's documents and
labels (decoded with the run's tokenizer, control tokens stripped), its own accuracy is measured on
the held-out split, and it then labels the generated samples. Control accuracy is the share of
samples the classifier assigns to the label they were generated with; read it next to the
classifier's own accuracy, which bounds how much it can be trusted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from aigc.errors import AigcError


@dataclass
class LabelClassifier:
    """A fitted TF-IDF vectoriser and logistic regression over the run's label names."""

    vectorizer: object
    model: object
    labels: tuple[str, ...]

    def probabilities(self, texts: Sequence[str]) -> np.ndarray:
        """(N, num_labels) probability of each label, columns in `self.labels` order."""
        proba = self.model.predict_proba(self.vectorizer.transform(list(texts)))
        columns = [list(self.model.classes_).index(i) for i in range(len(self.labels))]
        return proba[:, columns]

    def predict(self, texts: Sequence[str]) -> list[str]:
        return [self.labels[i] for i in self.probabilities(texts).argmax(axis=1)]


def labelled_texts(split, tokenizer, *, max_docs: int = 0, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Decoded texts (control tokens stripped) and label indices of a split's labelled documents.

    With `max_docs` > 0, a seeded random subset of that many documents is used.
    """
    rows = np.flatnonzero(split.docs[:, 2] >= 0)
    if max_docs and len(rows) > max_docs:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_docs, replace=False))
    texts = tokenizer.decode_batch([split.document(int(i)).tolist() for i in rows], skip_special=True)
    return texts, split.docs[rows, 2].astype(np.int64)


def train_classifier(
    train_texts: Sequence[str], train_labels: np.ndarray, labels: Sequence[str], *, seed: int = 0
) -> LabelClassifier:
    """Fit TF-IDF (unigrams, sublinear tf) + logistic regression on labelled texts."""
    # Deferred: a slow import that only this path needs.
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    present = np.unique(train_labels)
    if len(present) < 2:
        raise AigcError(f"the train split has {len(present)} distinct label(s); control accuracy needs at least two")
    vectorizer = TfidfVectorizer(max_features=20000, min_df=2, sublinear_tf=True, dtype=np.float32)
    features = vectorizer.fit_transform(list(train_texts))
    # liblinear fits IMDb's 24k reviews in seconds on two cores; lbfgs took twice as long here.
    model = LogisticRegression(solver="liblinear", C=2.0, random_state=seed)
    model.fit(features, train_labels)
    return LabelClassifier(vectorizer=vectorizer, model=model, labels=tuple(labels))


def classifier_accuracy(classifier: LabelClassifier, texts: Sequence[str], label_ids: np.ndarray) -> float | None:
    """Share of `texts` whose predicted label index equals `label_ids`; None for no texts."""
    if not len(texts):
        return None
    predicted = classifier.probabilities(texts).argmax(axis=1)
    return float(np.mean(predicted == np.asarray(label_ids)))


def control_accuracy(classifier: LabelClassifier, texts: Sequence[str], requested: Sequence[str]) -> dict:
    """Per requested label: the share of samples classified as that label and its mean probability."""
    proba = classifier.probabilities(texts) if texts else np.zeros((0, len(classifier.labels)))
    per_label = {}
    for label in sorted(set(requested), key=classifier.labels.index):
        rows = [i for i, r in enumerate(requested) if r == label]
        column = classifier.labels.index(label)
        per_label[label] = {
            "accuracy": float(np.mean(proba[rows].argmax(axis=1) == column)),
            "mean_probability": float(np.mean(proba[rows, column])),
            "num_samples": len(rows),
        }
    hits = [per_label[label]["accuracy"] * per_label[label]["num_samples"] for label in per_label]
    return {
        "accuracy": (sum(hits) / len(texts)) if texts else None,
        "per_label": per_label,
        "sample_probabilities": proba[np.arange(len(texts)), [classifier.labels.index(r) for r in requested]].tolist(),
    }
