"""Metrics of a trained run; no training and no plotting here.

- `lm`: loss, perplexity, bits per byte, next-token accuracy (sliding windows over whole documents)
- `reference`: BLEU / chrF (sacrebleu) and ROUGE (rouge-score) of continuations against real text
- `textstats`: distinct-n, self-BLEU, repeated 4-grams, length, end-of-text share
- `control`: TF-IDF + logistic-regression judge of whether samples carry the requested label
- `memorise`: hashed n-gram index of the train split, exact longest verbatim span per sample
- `privacy`: personal-data-like strings in generated text (the prepare step's own patterns)
- `run`: `evaluate_run`, which runs them all; `compare` and `describe` present the results
"""
