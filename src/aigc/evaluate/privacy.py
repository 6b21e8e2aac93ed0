"""Privacy check of generated text: no e-mail, phone, card or IP-like string should come out.

`aigc prepare` replaces such strings by placeholders (`<EMAIL>`, ...), so the model saw the
placeholders and never the originals. Here the prepare step's own `Redactor` (one set of patterns
for the whole project) is run over every generated text: anything it would redact is a personal-data
-like string the model produced. Placeholders in the output are counted too; they are expected.
"""

from __future__ import annotations

from collections.abc import Sequence

from aigc.data.redact import PLACEHOLDERS, Redactor


def redaction_check(texts: Sequence[str]) -> dict:
    """Counts per type of personal-data-like strings in `texts`, which texts hold them, and placeholders."""
    found = {name: 0 for name in PLACEHOLDERS}
    flagged = []
    for i, text in enumerate(texts):
        redactor = Redactor()
        redactor(text)
        if sum(redactor.counts.values()):
            flagged.append(i)
            for name, count in redactor.counts.items():
                found[name] += count
    placeholders = {f"<{name}>": sum(text.count(f"<{name}>") for text in texts) for name in PLACEHOLDERS}
    total = sum(found.values())
    summary = (
        f"Privacy: no e-mail, phone, card or IP-like string in {len(texts)} generated texts "
        f"(checked with the same patterns that redacted the training data)."
        if total == 0
        else f"Privacy: {total} personal-data-like string(s) in generated texts {flagged} "
        f"({', '.join(f'{k} {v}' for k, v in found.items() if v)}); inspect them before sharing samples."
    )
    if any(placeholders.values()):
        shown = ", ".join(f"`{k}` ×{v}" for k, v in placeholders.items() if v)
        summary += f" Placeholders generated (expected, the model learned them from redacted data): {shown}."
    return {
        "found": found,
        "total_found": total,
        "flagged_texts": flagged,
        "placeholders_generated": placeholders,
        "summary": summary,
        "computed_on": {"texts": len(texts), "patterns": "aigc.data.redact.Redactor"},
    }
