"""What each metric means, and the Markdown that presents `eval/metrics.json` to a reader.

The one-line explanations live here, next to the metric names, and are shared by the report, the
comparison table and the docs' metric list.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# (path in metrics.json, short name, one-line explanation, True if higher is better / None if neither)
Metric = tuple[tuple[str, ...], str, str, bool | None]

LM = ("language_modelling", "split")
SECTIONS: list[tuple[str, tuple[str, ...], list[Metric]]] = [
    (
        "Language modelling on held-out documents",
        LM,
        [
            (LM + ("loss",), "loss", "mean cross-entropy per token, in nats, over every token of each document", False),
            (
                LM + ("perplexity",),
                "perplexity",
                "exp(loss): the model is as unsure as a uniform pick among this many tokens",
                False,
            ),
            (
                LM + ("bits_per_byte",),
                "bits per byte",
                "total loss in bits / bytes of text; comparable across tokenizers",
                False,
            ),
            (
                LM + ("accuracy",),
                "next-token accuracy",
                "share of tokens where the most likely token is the true one",
                True,
            ),
        ],
    ),
    (
        "Language modelling on --text file",
        ("language_modelling", "text_file"),
        [
            (
                ("language_modelling", "text_file", "perplexity"),
                "perplexity",
                "perplexity on the user's text file",
                False,
            ),
            (
                ("language_modelling", "text_file", "bits_per_byte"),
                "bits per byte",
                "the same, per byte of text",
                False,
            ),
        ],
    ),
    (
        "Reference-based quality (continuations of held-out prompts)",
        ("reference",),
        [
            (
                ("reference", "bleu"),
                "BLEU",
                "sacrebleu corpus BLEU (0-100) of continuations against the real text",
                True,
            ),
            (
                ("reference", "chrf"),
                "chrF",
                "sacrebleu character n-gram F-score (0-100); kinder to word variants",
                True,
            ),
            (("reference", "rouge1"), "ROUGE-1", "rouge-score unigram-overlap F1 (0-1)", True),
            (("reference", "rouge2"), "ROUGE-2", "rouge-score bigram-overlap F1 (0-1)", True),
            (("reference", "rougeL"), "ROUGE-L", "rouge-score longest-common-subsequence F1 (0-1)", True),
        ],
    ),
    (
        "Diversity and degeneration (free samples)",
        ("diversity",),
        [
            (
                ("diversity", "distinct_1"),
                "distinct-1",
                "unique words / all words over all samples (higher = more varied)",
                True,
            ),
            (("diversity", "distinct_2"), "distinct-2", "the same for word pairs", True),
            (("diversity", "distinct_3"), "distinct-3", "the same for word triples", True),
            (
                ("diversity", "self_bleu"),
                "self-BLEU",
                "mean BLEU of each sample against the others (lower = more diverse)",
                False,
            ),
            (
                ("diversity", "repeated_4gram_share"),
                "repeated 4-grams",
                "share of a sample's 4-grams that repeat earlier ones (loops)",
                False,
            ),
            (("diversity", "mean_length_tokens"), "mean length", "generated tokens per sample", None),
            (
                ("diversity", "ended_at_eot_share"),
                "ended at end-of-text",
                "share of samples that finished by themselves",
                None,
            ),
        ],
    ),
    (
        "Fluency proxy",
        ("fluency",),
        [
            (
                ("fluency", "self", "perplexity"),
                "perplexity (self)",
                "perplexity of the generated tokens under the run itself",
                False,
            ),
            (("fluency", "self", "bits_per_byte"), "bits per byte (self)", "the same per byte of text", False),
            (("fluency", "judge", "perplexity"), "perplexity (judge)", "perplexity under the --judge run", False),
            (
                ("fluency", "judge", "bits_per_byte"),
                "bits per byte (judge)",
                "the same per byte; compare this across tokenizers",
                False,
            ),
        ],
    ),
    (
        "Control accuracy (samples generated with a label)",
        ("control",),
        [
            (
                ("control", "classifier", "held_out_accuracy"),
                "classifier accuracy",
                "the judge classifier's own accuracy on held-out documents",
                True,
            ),
            (
                ("control", "accuracy"),
                "control accuracy",
                "share of samples the classifier assigns to the label they were asked for",
                True,
            ),
        ],
    ),
    (
        "Memorisation and privacy",
        ("memorisation",),
        [
            (
                ("memorisation", "max_longest_span"),
                "longest verbatim span",
                "most tokens of one generated text found verbatim in the train split",
                False,
            ),
            (
                ("memorisation", "mean_longest_span"),
                "mean longest span",
                "per generated text (spans under 8 tokens count as 0)",
                False,
            ),
            (
                ("memorisation", "share_with_min_span"),
                "share memorised",
                "share of texts holding a verbatim train span of at least min-span tokens",
                False,
            ),
            (
                ("privacy", "total_found"),
                "personal-data strings",
                "e-mail/phone/card/IP-like strings in the generated text (should be 0)",
                False,
            ),
        ],
    ),
]


def lookup(data: dict, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def fmt(value: Any) -> str:
    """Numbers for people: ints with separators, floats to 4 significant digits, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table; cell text has pipes escaped and newlines flattened."""

    def cell(value: Any) -> str:
        text = value if isinstance(value, str) else fmt(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def computed_on(section: dict) -> str:
    info = section.get("computed_on") if isinstance(section, dict) else None
    if not info:
        return ""
    return "Computed on: " + "; ".join(f"{k.replace('_', ' ')} {fmt(v)}" for k, v in info.items()) + "."


def eval_markdown(evaluation: dict, chart: str | None = None) -> str:
    """The evaluation part of the report: one table per metric group, then samples."""
    head = (
        f"## Evaluation\n\nSplit `{lookup(evaluation, ('config', 'split'))}` of `{evaluation.get('data')}`; "
        f"sampling {_sampling_line(evaluation.get('sampling', {}))}; took {fmt(evaluation.get('elapsed_s'))} s."
    )
    parts = [head]
    for title, where, metrics in SECTIONS:
        section = lookup(evaluation, where)
        if section is None:
            continue
        if isinstance(section, dict) and section.get("skipped"):
            parts.append(f"### {title}\n\nSkipped: {section['skipped']}.")
            continue
        rows = [
            (name, lookup(evaluation, path), meaning)
            for path, name, meaning, _ in metrics
            if lookup(evaluation, path) is not None
        ]
        parts.append(
            f"### {title}\n\n" + table(["metric", "value", "meaning"], rows) + _section_notes(section, evaluation)
        )
    if chart:
        parts.append(f"### Comparison\n\n![comparison]({chart})")
    parts.append(samples_markdown(evaluation.get("samples", [])))
    return "\n\n".join(parts)


def _section_notes(section: dict, evaluation: dict) -> str:
    notes = [computed_on(section)]
    if isinstance(section, dict) and "note" in section:
        notes.append(section["note"])
    if isinstance(section, dict) and "per_label" in section:
        per = ", ".join(f"`{k}` {fmt(v['accuracy'])} (n={v['num_samples']})" for k, v in section["per_label"].items())
        notes.append(f"Per label: {per}.")
    privacy = evaluation.get("privacy") or {}
    if section is evaluation.get("memorisation") and privacy:
        notes.append(privacy.get("summary", ""))
    return "".join(f"\n\n{n}" for n in notes if n)


def _sampling_line(sampling: dict) -> str:
    keys = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens", "seed")
    return ", ".join(f"{k.replace('_', ' ')} {fmt(sampling.get(k))}" for k in keys if k in sampling)


def samples_markdown(samples: Sequence[dict], per_group: int = 3) -> str:
    """A few samples per label (then a few continuations), each with its scores."""
    if not samples:
        return ""
    parts = ["### Samples"]
    free = [s for s in samples if s["kind"] == "sample"]
    for label in dict.fromkeys(s["label"] for s in free):
        parts.append(f"**{'label `' + label + '`' if label else 'unconditional'}**")
        parts += [_sample_block(s) for s in free if s["label"] == label][:per_group]
    continuations = [s for s in samples if s["kind"] == "continuation"][:per_group]
    if continuations:
        parts.append("**Continuations of held-out prompts** (prompt, then the model's text, then the real one)")
        parts += [_sample_block(s) for s in continuations]
    return "\n\n".join(parts)


def _sample_block(sample: dict) -> str:
    scores = [f"{sample['tokens']} tokens" + (", ended by itself" if sample.get("ended_at_eot") else "")]
    if sample.get("label_probability") is not None:
        scores.append(f"P({sample['label']}) = {sample['label_probability']:.2f}")
    if sample.get("perplexity") is not None:
        scores.append(f"perplexity {sample['perplexity']:.1f}")
    scores.append(f"longest verbatim train span {sample.get('longest_span', 0)} tokens")
    text = _fenced(sample["text"])
    if sample["kind"] == "continuation":
        text = "\n\n".join(
            ["Prompt:", _fenced(sample["prompt"]), "Model:", text, "Real:", _fenced(sample.get("reference") or "")]
        )
    return f"_{' · '.join(scores)}_\n\n{text}"


def _fenced(text: str) -> str:
    """A fenced block longer than any backtick run inside, so model output cannot break out of it."""
    fence = "`" * max(3, _longest_backtick_run(text) + 1)
    return f"{fence}text\n{text}\n{fence}"


def _longest_backtick_run(text: str) -> int:
    best = run = 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        best = max(best, run)
    return best
