"""The demo's own report sections (added to the run report by `Demo.write_report`): its samples, the
base and the fine-tuned run side by side (and the from-scratch run), the demo's targets checked
against the evaluations, and how long each step took."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from aigc.artifacts.run import EVAL
from aigc.evaluate.compare import comparison_rows, comparison_table
from aigc.evaluate.describe import fmt, lookup

Section = tuple[str, str]
BPB = ("language_modelling", "split", "bits_per_byte")
PPL = ("language_modelling", "split", "perplexity")
JUDGE_PPL = ("fluency", "judge", "perplexity")
SELF_PPL = ("fluency", "self", "perplexity")
MIN_CONTROL = 0.85
MAX_DISTINCT_GAP = 0.05  # samples' distinct-2 within this of human reviews' of the same count and lengths


def report_sections(
    out: Path, samples: Sequence[dict], evaluations: dict[str, dict], seconds: dict[str, float]
) -> list[Section]:
    sections = [("Demo samples", samples_markdown(samples))]
    if "base" in evaluations and "fine-tuned" in evaluations:
        sections.append(("Base and fine-tuned side by side", side_by_side(out, evaluations)))
        rows = targets(evaluations["base"], evaluations["fine-tuned"])
        sections.append(("Targets", targets_markdown(rows)))
    sections.append(("Timings", timings_markdown(seconds)))
    return sections


def samples_markdown(samples: Sequence[dict]) -> str:
    parts = []
    for s in samples:
        title = f"**{s['label']}** review" if s["label"] else f"**continuation** of “{s['prompt']}”"
        body = f"{s['prompt']} {s['text']}" if s["prompt"] else s["text"]
        parts.append(f"{title}\n\n> {' '.join(body.split())}")
    return "\n\n".join(parts)


def side_by_side(out: Path, evaluations: dict[str, dict]) -> str:
    """The headline metrics as a table, plus RUN/eval/compare.png (the eval section shows the chart)."""
    # Deferred: matplotlib is slow to import and only the chart needs it.
    from aigc.plots import comparison_chart

    names, results = list(evaluations), list(evaluations.values())
    rows = comparison_rows(results)
    comparison_chart(names, rows, out / EVAL / "compare.png")
    lines = [
        "Every model scored on the same held-out documents (the base without the `<|pos|>`/`<|neg|>` tokens, "
        "which it has no id for; bits per byte count the same text) and sampled with the same settings: each "
        "label's samples start from its sentence and are guided away from the other label's "
        f"(`guidance_scale` {lookup(results[0], ('sampling', 'guidance_scale'))}). `*` marks the best.",
        "",
        "```text",
        comparison_table(names, rows),
        "```",
    ]
    return "\n".join(lines)


def targets(base: dict, tuned: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for each of the demo's targets; met is None where a figure is missing."""
    rows = []
    b_bpb, t_bpb = lookup(base, BPB), lookup(tuned, BPB)
    rows.append(
        (
            "fine-tuned val bits/byte below the base's (same documents)",
            f"{fmt(t_bpb)} vs {fmt(b_bpb)}" + (f" ({(b_bpb - t_bpb) / b_bpb:.1%} lower)" if _all(b_bpb, t_bpb) else ""),
            _all(b_bpb, t_bpb) and t_bpb < b_bpb,
        )
    )
    rows += control_rows(base, tuned)
    judge, human = lookup(tuned, JUDGE_PPL), lookup(base, PPL)
    rows.append(
        (
            "samples' perplexity under the base ≤ held-out human reviews'",
            f"{fmt(judge)} vs {fmt(human)} (base's own samples: {fmt(lookup(base, SELF_PPL))})",
            _all(judge, human) and judge <= human,
        )
    )
    b, t = lookup(base, ("diversity", "repeated_4gram_share")), lookup(tuned, ("diversity", "repeated_4gram_share"))
    rows.append(("repeated 4-gram share ≤ the base's", f"{fmt(t)} vs {fmt(b)}", _all(b, t) and t <= b))
    rows += distinct_rows(base, tuned)
    span, min_span = lookup(tuned, ("memorisation", "max_longest_span")), lookup(tuned, ("memorisation", "min_span"))
    rows.append(
        (
            f"no sample copies ≥ {min_span} tokens of the training data",
            f"longest copied span {span} tokens",
            _all(span, min_span) and span < min_span,
        )
    )
    return [(name, value, None if met is None else bool(met)) for name, value, met in rows]


def distinct_rows(base: dict, tuned: dict) -> list[tuple[str, str, bool | None]]:
    """Distinct-2 of the guided samples and, where drawn, of the unguided ones (the control token
    alone), each against held-out human reviews of the same count cut to the same lengths."""
    gap = MAX_DISTINCT_GAP
    t, b = lookup(tuned, ("diversity", "distinct_2")), lookup(base, ("diversity", "distinct_2"))
    human = lookup(tuned, ("diversity", "human", "distinct_2"))
    rows = [
        (
            f"distinct-2 of the guided samples within {gap} of held-out human reviews' (as many, cut alike)",
            f"{fmt(t)} vs {fmt(b)} (human reviews: {fmt(human)})",
            _all(t, human) and abs(t - human) <= gap,
        )
    ]
    plain = lookup(tuned, ("diversity", "unguided", "distinct_2"))
    plain_human = lookup(tuned, ("diversity", "unguided", "human", "distinct_2"))
    if plain is not None:
        rows.append(
            (
                f"distinct-2 of the unguided samples within {gap} of held-out human reviews' (as many, cut alike)",
                f"{fmt(plain)} (human reviews: {fmt(plain_human)})",
                _all(plain, plain_human) and abs(plain - plain_human) <= gap,
            )
        )
    return rows


def control_rows(base: dict, tuned: dict) -> list[tuple[str, str, bool | None]]:
    """Control accuracy with guidance (each label's sentence, guided away from the other's) and without
    it (the control token alone): the second says whether the labels were learnt, not forced."""
    guided, base_guided = lookup(tuned, ("control", "accuracy")), lookup(base, ("control", "accuracy"))
    plain = lookup(tuned, ("control", "unguided", "accuracy"))
    per_label = lookup(tuned, ("control", "unguided", "per_label")) or {}
    counts = ", ".join(f"{label} {_pct(v['accuracy'])} of {v['num_samples']}" for label, v in per_label.items())
    return [
        (
            f"control accuracy without guidance ≥ {MIN_CONTROL:.0%} (the control token alone)",
            f"{_pct(plain)}{f' ({counts})' if counts else ''} vs {_pct(guided)} guided",
            _all(plain) and plain >= MIN_CONTROL,
        ),
        (
            f"control accuracy with guidance ≥ {MIN_CONTROL:.0%} (the label's sentence, guided)",
            f"{_pct(guided)} vs {_pct(base_guided)} (the base: the label's sentence alone, no control token)",
            _all(guided) and guided >= MIN_CONTROL,
        ),
    ]


def targets_markdown(rows: Sequence[tuple[str, str, bool | None]]) -> str:
    mark = {True: "met", False: "**not met**", None: "not measured"}
    lines = ["| target | fine-tuned vs base | |", "|---|---|---|"]
    lines += [f"| {name} | {value} | {mark[met]} |" for name, value, met in rows]
    return "\n".join(lines)


def timings_markdown(seconds: dict[str, float]) -> str:
    lines = ["| step | wall-clock |", "|---|---|"]
    lines += [f"| {name} | {s:.0f} s |" for name, s in seconds.items()]
    lines.append(f"| **total** | **{sum(seconds.values()) / 60:.1f} min** |")
    return "\n".join(lines)


def _all(*values) -> bool:
    return all(isinstance(v, (int, float)) for v in values)


def _pct(value) -> str:
    return f"{value:.1%}" if isinstance(value, (int, float)) else "n/a"
