"""Diversity and degeneration of generated text: distinct-n, self-BLEU, repeated n-grams.

All counts are over *words*: runs of letters/digits, single punctuation marks, and single CJK
characters (Chinese has no spaces, so each character counts as a word). Counting words rather than
model tokens keeps the figures comparable between runs with different tokenizers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words of `text` (see the module docstring for what a word is)."""
    return _WORD.findall(text.lower())


class WordTokenizer:
    """The `tokenize()` object that `rouge-score` accepts, so ROUGE sees the same words as distinct-n
    (its default tokenizer drops every non-ASCII character, which would make Chinese text empty)."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique n-grams / all n-grams, pooled over every text (Li et al. 2016). None when no n-grams."""
    pooled = [gram for text in texts for gram in ngrams(words(text), n)]
    return len(set(pooled)) / len(pooled) if pooled else None


def repeated_ngram_share(text: str, n: int = 4) -> float | None:
    """Share of a text's n-grams that repeat an n-gram seen earlier in the same text.

    0 for text without repetition; close to 1 for a degenerate loop. None when shorter than n words.
    """
    grams = ngrams(words(text), n)
    return 1.0 - len(set(grams)) / len(grams) if grams else None


def self_bleu(texts: Sequence[str], max_texts: int = 100) -> float | None:
    """Mean sentence BLEU (sacrebleu, 0-100) of each text against all the others (Zhu et al. 2018).

    High means the samples resemble each other (low diversity). Quadratic in the number of texts, so
    only the first `max_texts` are used. None with fewer than two non-empty texts.
    """
    # Deferred: a slow import that only this path needs.
    from sacrebleu.metrics import BLEU

    texts = [t for t in texts if t.strip()][:max_texts]
    if len(texts) < 2:
        return None
    bleu = BLEU(effective_order=True)
    scores = [bleu.sentence_score(t, texts[:i] + texts[i + 1 :]).score for i, t in enumerate(texts)]
    return sum(scores) / len(scores)


def mean(values: Sequence[float | None]) -> float | None:
    """Mean of the values that are not None; None when there are none."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def diversity_metrics(texts: Sequence[str], lengths: Sequence[int], finished: Sequence[bool]) -> dict:
    """Distinct-1/2/3, self-BLEU, repeated 4-gram share, mean length and share ending at end-of-text.

    `lengths` are generated token counts; `finished[i]` is True when sample i ended at end-of-text.
    """
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "self_bleu": self_bleu(texts),
        "repeated_4gram_share": mean([repeated_ngram_share(t, 4) for t in texts]),
        "mean_length_tokens": mean([float(n) for n in lengths]),
        "ended_at_eot_share": mean([float(f) for f in finished]),
        "num_samples": len(texts),
    }
