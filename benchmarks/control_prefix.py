"""Control accuracy of label control tokens against a plain text prefix, judged by the project's
sentiment classifier (aigc.evaluate.control: TF-IDF + logistic regression on the dataset's train split).

For each run: `token` samples start with the label's control token (`<|pos|>`; runs whose tokenizer has
labels), `prefix` samples start from the text "Positive movie review:\\n" / "Negative ...". Samples are
drawn in batches with one seed per row, temperature 0.8, top-k 50.

    AIGC_HOME=/tmp/aigc_home python benchmarks/control_prefix.py --data data/imdb-smol smollm2-135m runs/smol-lora
"""

from __future__ import annotations

import argparse

from aigc.artifacts.dataset import open_dataset
from aigc.config import SampleConfig
from aigc.evaluate.control import classifier_accuracy, control_accuracy, labelled_texts, train_classifier
from aigc.generate import Request, generate
from aigc.models import load_run

PREFIX = {"pos": "Positive movie review:\n", "neg": "Negative movie review:\n"}


def samples(run, how: str, n: int, tokens: int) -> tuple[list[str], list[str]]:
    texts, requested = [], []
    for label in ("pos", "neg"):
        requests = [
            Request(
                prompt=PREFIX[label] if how == "prefix" else "",
                label=label if how == "token" else None,
                config=SampleConfig(max_new_tokens=tokens, temperature=0.8, top_k=50, seed=i),
            )
            for i in range(n)
        ]
        texts += [c.text for c in generate(run.model, run.tokenizer, requests)]
        requested += [label] * n
    return texts, requested


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--data", required=True)
    parser.add_argument("--samples", type=int, default=16, help="per label")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--classifier-docs", type=int, default=5000)
    args = parser.parse_args()
    data = open_dataset(args.data)
    train_texts, train_ids = labelled_texts(data.train, data.tokenizer, max_docs=args.classifier_docs)
    classifier = train_classifier(train_texts, train_ids, data.labels)
    val_texts, val_ids = labelled_texts(data.val, data.tokenizer, max_docs=1000)
    print(f"classifier accuracy on val: {classifier_accuracy(classifier, val_texts, val_ids):.1%}")
    for path in args.runs:
        run = load_run(path)
        for how in ("token", "prefix") if run.tokenizer.labels else ("prefix",):
            texts, requested = samples(run, how, args.samples, args.tokens)
            accuracy = control_accuracy(classifier, texts, requested)["accuracy"]
            print(f"{path}: {how:6s} control accuracy {accuracy:.1%} ({len(texts)} samples of {args.tokens} tokens)")


if __name__ == "__main__":
    main()
