"""Reference-based quality: a continuation scored against the true one with BLEU, chrF and ROUGE.

BLEU and chrF come from `sacrebleu` (corpus level, its default 13a tokenization) and ROUGE-1/2/L
F-measures from `rouge-score` (averaged over pairs, on the same words as the diversity metrics so that
Chinese text is not dropped). Nothing here re-implements a metric.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aigc.errors import AigcError
from aigc.evaluate.textstats import WordTokenizer
from aigc.fsutil import parse_jsonl_objects


@dataclass(frozen=True)
class Pair:
    """A prompt, the text that really follows it, and (for held-out documents) its label."""

    prompt: str
    reference: str
    label: str | None = None


def read_references(path: str | os.PathLike) -> list[Pair]:
    """Read a JSONL file of {"prompt": ..., "reference": ...} objects (an optional "label" too)."""
    path = Path(path)
    if not path.is_file():
        raise AigcError(f'references file not found: {path}; give a JSONL file of {{"prompt", "reference"}} lines')
    pairs = []
    for number, row in parse_jsonl_objects(path.read_text(encoding="utf-8"), path):
        if not isinstance(row.get("prompt"), str) or not isinstance(row.get("reference"), str):
            raise AigcError(f'{path} line {number} needs string fields "prompt" and "reference"; got {sorted(row)}')
        label = row.get("label")
        pairs.append(Pair(row["prompt"], row["reference"], label if isinstance(label, str) else None))
    if not pairs:
        raise AigcError(f'{path} holds no reference pairs; add JSONL lines with "prompt" and "reference"')
    return pairs


def held_out_pairs(
    split, tokenizer, labels: Sequence[str], *, count: int, prompt_tokens: int, reference_tokens: int, seed: int
) -> list[Pair]:
    """Prompt = the first `prompt_tokens` tokens of a held-out document, reference = the next
    `reference_tokens` (or fewer, to the end of the document). Documents are drawn in a seeded random
    order, keeping those with at least 8 tokens of continuation."""
    special = np.array([tokenizer.is_special(i) for i in range(tokenizer.vocab_size)])
    order = np.random.default_rng(seed).permutation(len(split.docs))
    pairs = []
    for i in order:
        if len(pairs) == count:
            break
        ids = split.document(int(i))
        content = ids[~special[ids]]  # drop the control token and end-of-text
        if len(content) < prompt_tokens + 8:
            continue
        label_index = int(split.docs[i, 2])
        prompt, reference = _cut(tokenizer, content, prompt_tokens, reference_tokens)
        pairs.append(Pair(prompt, reference, labels[label_index] if 0 <= label_index < len(labels) else None))
    return pairs


def _cut(tokenizer, content: np.ndarray, prompt_tokens: int, reference_tokens: int) -> tuple[str, str]:
    """Prompt and reference text, moving the cut past any character split across byte-level tokens."""
    cut = prompt_tokens
    prompt = tokenizer.decode(content[:cut].tolist())
    while prompt.endswith("\ufffd") and cut < min(len(content), prompt_tokens + 3):
        cut += 1
        prompt = tokenizer.decode(content[:cut].tolist())
    reference = tokenizer.decode(content[cut : cut + reference_tokens].tolist())
    return prompt, reference.rstrip("\ufffd")


def reference_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """Corpus BLEU and chrF (sacrebleu, 0-100) and mean ROUGE-1/2/L F1 (rouge-score, 0-1)."""
    # Deferred: a slow import that only this path needs.
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF

    assert len(hypotheses) == len(references)
    if not hypotheses:
        return {"num_pairs": 0}
    bleu = BLEU().corpus_score(list(hypotheses), [list(references)])
    chrf = CHRF().corpus_score(list(hypotheses), [list(references)])
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=WordTokenizer())
    rouge = [scorer.score(ref, hyp) for hyp, ref in zip(hypotheses, references)]
    return {
        "bleu": bleu.score,
        "chrf": chrf.score,
        "rouge1": float(np.mean([r["rouge1"].fmeasure for r in rouge])),
        "rouge2": float(np.mean([r["rouge2"].fmeasure for r in rouge])),
        "rougeL": float(np.mean([r["rougeL"].fmeasure for r in rouge])),
        "num_pairs": len(hypotheses),
    }
