"""Control accuracy of label control tokens against a plain text prefix, with and without guidance,
judged by the project's sentiment classifier (aigc.evaluate.control: TF-IDF + logistic regression on
the dataset's train split).

For each run: `token` samples start with the label's control token (`<|pos|>`; runs whose tokenizer has
labels), `prefix` samples start from the text "Positive movie review:\n" / "Negative ...". With a
guidance scale above 1 (aigc.guidance), `token` samples are guided away from the other label's token and
`prefix` samples from the other label's text. Samples are drawn in batches with one seed per row,
temperature 0.8, top-k 50; the same seeds for every run, mode and scale.

    AIGC_HOME=/tmp/aigc_home python benchmarks/control_prefix.py --data data/imdb-smol smollm2-135m runs/demo \
        --guidance 1 3
"""

from __future__ import annotations

import argparse

from aigc.artifacts.dataset import open_dataset
from aigc.config import SampleConfig
from aigc.evaluate.control import classifier_accuracy, control_accuracy, labelled_texts, train_classifier
from aigc.evaluate.run import for_inference
from aigc.generate import Request, generate
from aigc.models import load_run

PREFIX = {"pos": "Positive movie review:\n", "neg": "Negative movie review:\n"}


def samples(run, how: str, n: int, tokens: int, scale: float) -> tuple[list[str], list[str]]:
    texts, requested = [], []
    for label, other in (("pos", "neg"), ("neg", "pos")):
        guided = scale != 1.0
        requests = [
            Request(
                prompt=PREFIX[label] if how == "prefix" else "",
                label=label if how == "token" else None,
                config=SampleConfig(max_new_tokens=tokens, temperature=0.8, top_k=50, seed=i, guidance_scale=scale),
                negative_prompt=PREFIX[other] if guided and how == "prefix" else "",
                negative_label=other if guided and how == "token" else None,
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
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0], help="guidance scales to try")
    args = parser.parse_args()
    data = open_dataset(args.data)
    train_texts, train_ids = labelled_texts(data.train, data.tokenizer, max_docs=args.classifier_docs)
    classifier = train_classifier(train_texts, train_ids, data.labels)
    val_texts, val_ids = labelled_texts(data.val, data.tokenizer, max_docs=1000)
    print(f"classifier accuracy on val: {classifier_accuracy(classifier, val_texts, val_ids):.1%}")
    for path in args.runs:
        run = for_inference(load_run(path))  # a LoRA run folded: one matmul per layer
        for how in ("token", "prefix") if run.tokenizer.labels else ("prefix",):
            for scale in args.guidance:
                texts, requested = samples(run, how, args.samples, args.tokens, scale)
                accuracy = control_accuracy(classifier, texts, requested)["accuracy"]
                shown = f"{path}: {how:6s} guidance {scale:g}: control accuracy {accuracy:.1%}"
                print(f"{shown} ({len(texts)} samples of {args.tokens} tokens)", flush=True)


if __name__ == "__main__":
    main()
