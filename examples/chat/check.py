"""Instruction-following check for `aigc batch --chat` outputs: does each answer name the product, and
does it stay under the length the instruction asked for?

    python examples/chat/check.py OUT.jsonl --name-field title --max-sentences 2 --max-words 60
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path


def sentences(text: str) -> int:
    """Sentences: runs of text ended by . ! or ? (a trailing fragment counts as one)."""
    parts = [p for p in re.split(r"(?<=[.!?])\s+", text.strip()) if p.strip()]
    return len(parts)


def check(row: dict, name_field: str, max_sentences: int | None, max_words: int | None) -> dict:
    text = row["generated"].strip()
    result = {
        "names_product": row[name_field].lower() in text.lower(),
        "short_enough": (max_sentences is None or sentences(text) <= max_sentences)
        and (max_words is None or len(text.split()) <= max_words),
        "not_empty": bool(text),
    }
    result["follows"] = all(result.values())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="an `aigc batch` output (.jsonl)")
    parser.add_argument("--name-field", required=True, help="the column whose value the answer must mention")
    parser.add_argument("--max-sentences", type=int, help="most sentences the instruction allowed")
    parser.add_argument("--max-words", type=int, help="most words the instruction allowed")
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.out.read_text(encoding="utf-8").splitlines() if line.strip()]
    results = [check(row, args.name_field, args.max_sentences, args.max_words) for row in rows]
    for key in ("names_product", "short_enough", "follows"):
        hits = sum(r[key] for r in results)
        print(f"{key:<14} {hits}/{len(rows)} ({hits / len(rows):.0%})")


if __name__ == "__main__":
    main()
