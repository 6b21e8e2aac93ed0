"""`aigc eval RUN [RUN2 ...]`: measure a run's text (quality, diversity, control, memorisation), write
RUN/eval/metrics.json and refresh RUN/report.{md,html}; with several runs, also compare them."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from aigc.cli.args import add_dataclass_args, dataclass_from_args
from aigc.config import EvalConfig, SampleConfig
from aigc.errors import AigcError
from aigc.fsutil import write_json

# Sampling options that eval sets itself: length from --max-new-tokens, seed from --seed.
_SAMPLING_EXCLUDED = ("max_new_tokens", "min_new_tokens", "stop", "seed", "logprobs")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate runs: perplexity, BLEU/chrF/ROUGE, diversity, control, memorisation; compare runs",
        description=(
            "Score RUN on held-out documents, generate continuations and free samples, and measure them: "
            "reference overlap (BLEU, chrF, ROUGE), diversity, fluency, control accuracy (labelled runs) "
            "and verbatim overlap with the training data. Writes RUN/eval/metrics.json and refreshes "
            "RUN/report.md/.html. With several runs, prints a side-by-side table and writes a bar chart."
        ),
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folder(s) made by `aigc train`")
    parser.add_argument("--data", metavar="DIR", help="prepared dataset folder (default: the one recorded in the run)")
    parser.add_argument(
        "--references",
        metavar="FILE",
        help='JSONL of {"prompt", "reference"} pairs to score instead of held-out documents',
    )
    parser.add_argument("--text", metavar="FILE", help="also report perplexity on this UTF-8 text file")
    parser.add_argument(
        "--judge", metavar="RUN2", help="second run whose perplexity of the generated text is a fluency proxy"
    )
    parser.add_argument(
        "--out", metavar="FILE", help="write the metrics JSON here instead of RUN/eval/metrics.json (one run only)"
    )
    parser.add_argument(
        "--chart", metavar="PNG", help="comparison bar chart for several runs (default: FIRST_RUN/eval/compare.png)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the files --out and --chart name if they exist"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="reuse a run's existing eval/metrics.json instead of evaluating it again"
    )
    add_dataclass_args(parser, EvalConfig)
    add_dataclass_args(parser, SampleConfig, exclude=_SAMPLING_EXCLUDED)
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    config = dataclass_from_args(args, EvalConfig)
    sampling = dataclass_from_args(args, SampleConfig, max_new_tokens=config.max_new_tokens)
    if args.out and len(args.runs) > 1:
        raise AigcError(
            "--out names one metrics file but several runs were given; drop --out (each run gets RUN/eval/metrics.json)"
        )
    _refuse_existing(args)
    results = [_evaluate_one(Path(run), args, config, sampling) for run in args.runs]
    if len(results) == 1:
        _print_single(results[0])
    else:
        _compare(args, results)
    return 0


def _refuse_existing(args: argparse.Namespace) -> None:
    """Files the user named are replaced only with --overwrite (a run's own eval/ files are refreshed)."""
    if args.overwrite:
        return
    if args.out and Path(args.out).exists() and not args.reuse:
        raise AigcError(f"--out {args.out} exists; pass --overwrite to replace it (or --reuse to read it)")
    if args.chart and len(args.runs) > 1 and Path(args.chart).exists():
        raise AigcError(f"--chart {args.chart} exists; pass --overwrite to replace it")


def _evaluate_one(run: Path, args: argparse.Namespace, config: EvalConfig, sampling: SampleConfig) -> dict:
    # Deferred: a slow import that only this path needs.
    from aigc.evaluate.run import evaluate_run
    from aigc.report import write_report

    out = Path(args.out) if args.out else run / "eval" / "metrics.json"
    if args.reuse and out.is_file():
        _say(f"{run.name}: reusing {out}")
        return json.loads(out.read_text(encoding="utf-8"))
    result = evaluate_run(
        run,
        config=config,
        sampling=sampling,
        data=args.data,
        references=args.references,
        text=args.text,
        judge=args.judge,
        progress=lambda message: _say(f"{run.name}: {message}"),
    )
    write_json(out, result)
    _say(f"{run.name}: metrics written to {out}")
    if result["control"].get("skipped"):
        _say(f"{run.name}: control accuracy skipped: {result['control']['skipped']}")
    found = result["privacy"].get("total_found", 0)
    if found:
        _say(f"{run.name}: warning: {found} personal-data-like string(s) in generated text; see the report")
    md, html = write_report(run, evaluation=result)
    _say(f"{run.name}: report {md} and {html}")
    return result


def _print_single(result: dict) -> None:
    # Deferred: a slow import that only this path needs.
    from aigc.evaluate.compare import comparison_rows, comparison_table

    print(comparison_table([Path(result["run"]).name], comparison_rows([result])))


def _compare(args: argparse.Namespace, results: list[dict]) -> None:
    # Deferred: a slow import that only this path needs.
    from aigc.evaluate.compare import comparison_rows, comparison_table
    from aigc.plots import comparison_chart
    from aigc.report import write_report

    names = [Path(r["run"]).name for r in results]
    if len(set(names)) < len(names):
        names = [r["run"] for r in results]
    rows = comparison_rows(results)
    print(comparison_table(names, rows))
    chart = Path(args.chart) if args.chart else Path(args.runs[0]) / "eval" / "compare.png"
    comparison_chart(names, rows, chart)
    _say(f"comparison chart written to {chart}")
    if not args.chart:
        write_report(args.runs[0])  # its report now shows the chart


def _say(message: str) -> None:
    print(f"aigc eval: {message}", file=sys.stderr, flush=True)
