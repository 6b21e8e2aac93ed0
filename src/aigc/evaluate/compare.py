"""Side by side: the headline metrics of several evaluated runs (GPT vs LSTM, scratch vs fine-tuned)."""

from __future__ import annotations

from collections.abc import Sequence

from aigc.evaluate.describe import LM, fmt, lookup

# (path in metrics.json, name, True if higher is better)
HEADLINE: list[tuple[tuple[str, ...], str, bool]] = [
    (LM + ("loss",), "val loss", False),
    (LM + ("perplexity",), "val perplexity", False),
    (LM + ("bits_per_byte",), "bits per byte", False),
    (LM + ("accuracy",), "next-token acc.", True),
    (("reference", "bleu"), "BLEU", True),
    (("reference", "chrf"), "chrF", True),
    (("reference", "rougeL"), "ROUGE-L", True),
    (("diversity", "distinct_2"), "distinct-2", True),
    (("diversity", "self_bleu"), "self-BLEU", False),
    (("diversity", "repeated_4gram_share"), "repeated 4-grams", False),
    (("fluency", "judge", "bits_per_byte"), "fluency bpb (judge)", False),
    (("control", "accuracy"), "control accuracy", True),
    (("memorisation", "share_with_min_span"), "share memorised", False),
]


def comparison_rows(results: Sequence[dict]) -> list[tuple[str, bool, list[float | None]]]:
    """(metric name, higher is better, one value per run) for every metric at least one run has."""
    rows = []
    for path, name, higher in HEADLINE:
        values = [lookup(result, path) for result in results]
        if any(isinstance(v, (int, float)) for v in values):
            rows.append((name, higher, [float(v) if isinstance(v, (int, float)) else None for v in values]))
    return rows


def best_index(values: Sequence[float | None], higher: bool) -> int | None:
    """Index of the single best value; None with fewer than two values or a tie for best."""
    present = [v for v in values if v is not None]
    if len(present) < 2:
        return None
    best = max(present) if higher else min(present)
    winners = [i for i, v in enumerate(values) if v == best]
    return winners[0] if len(winners) == 1 else None


def comparison_table(names: Sequence[str], rows: Sequence[tuple[str, bool, list[float | None]]]) -> str:
    """A fixed-width text table for the terminal; `*` marks the best run on each metric."""
    header = ["metric"] + list(names)
    body = []
    for name, higher, values in rows:
        best = best_index(values, higher)
        arrow = "↑" if higher else "↓"
        body.append([f"{name} {arrow}"] + [fmt(v) + ("*" if i == best else "") for i, v in enumerate(values)])
    widths = [max(len(row[c]) for row in [header] + body) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
