"""Diversity of held-out human text cut like the samples: the reference that samples' distinct-n is read
against. Distinct-n pools n-grams over every text, so it falls as texts get longer or more numerous;
only human text of the same count and lengths gives a figure that compares."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aigc.evaluate import textstats


def human_diversity(split, tokenizer, lengths: Sequence[int], *, seed: int) -> dict:
    """Distinct-1/2 and repeated 4-gram share of len(lengths) held-out documents in a seeded order, the
    i-th cut to its first lengths[i] tokens (control tokens and end-of-text dropped), one per sample."""
    special = np.array([tokenizer.is_special(i) for i in range(tokenizer.vocab_size)])
    wanted = [n for n in lengths if n > 0]
    contents = [split.document(int(i)) for i in np.random.default_rng(seed).permutation(len(split.docs))]
    contents = [ids[~special[ids]] for ids in contents]
    # Documents at least as long as their sample get the same cut; should too few be that long (a toy
    # dataset), the longest others fill in whole, and the figure says how many did.
    chosen, shorter = [], 0
    rest = sorted(contents, key=len, reverse=True)
    for length in wanted:
        fit = next((k for k, ids in enumerate(contents) if len(ids) >= length), None)
        if fit is not None:
            ids = contents.pop(fit)
            rest = [r for r in rest if r is not ids]
        elif rest:
            ids, shorter = rest[0], shorter + 1
            rest = rest[1:]
            contents = [c for c in contents if c is not ids]
        else:
            break
        chosen.append(ids[:length])
    texts = [tokenizer.decode(ids.tolist()).rstrip("\ufffd") for ids in chosen]
    return {
        "distinct_1": textstats.distinct_n(texts, 1),
        "distinct_2": textstats.distinct_n(texts, 2),
        "repeated_4gram_share": textstats.mean([textstats.repeated_ngram_share(t, 4) for t in texts]),
        "computed_on": {
            "documents": len(texts),
            "shorter_than_their_sample": shorter,
            "tokens_each": "the token count of one sample each",
            "mean_tokens": textstats.mean([float(n) for n in wanted[: len(texts)]]),
            "unit": "words",
        },
    }
