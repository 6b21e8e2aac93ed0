"""`aigc demo`: fine-tune the built-in pretrained base on IMDb, end to end, in about 10 minutes on a CPU.

pull the base (SmolLM2-135M) → prepare IMDb with its tokenizer and <|pos|>/<|neg|> → evaluate the base →
LoRA fine-tune for --steps (or --minutes) → three positive and three negative reviews plus two fixed continuations →
evaluate the fine-tuned run (the base judging its samples) → RUN/report.md and .html with the base and
the fine-tuned model side by side and the demo's targets checked. `--compare-scratch` also trains the
`small` GPT from scratch (with a tokenizer of its own) and adds it to the comparison.
Re-running reuses the prepared data, a finished run and finished evaluations unless --fresh.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from aigc.artifacts.run import BUILT_IN_MODELS
from aigc.cli import demo_steps as steps
from aigc.config import MODEL_PRESETS, SampleConfig
from aigc.errors import AigcError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune the built-in base on IMDb reviews and compare, in about 10 minutes on a CPU",
        description=(
            "Pull the pretrained base, prepare the IMDb reviews with its tokenizer and pos/neg labels, "
            "evaluate the base, LoRA fine-tune it for --steps, generate positive and negative reviews, "
            "evaluate the fine-tuned run and write RUN/report.md and RUN/report.html with both side by "
            "side. Re-running reuses the data, a finished run and finished evaluations."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--base",
        default=BUILT_IN_MODELS[0],
        help=f"pretrained base: a built-in name ({', '.join(BUILT_IN_MODELS)}, pulled once) or a run folder",
    )
    parser.add_argument(
        "--source",
        default="imdb",
        help="corpus: imdb, rotten-tomatoes, or a CSV with `text` and `label` columns (for quick trials)",
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data/imdb-smol"), help="dataset prepared with the base's tokenizer"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="fine-tuned run folder")
    parser.add_argument(
        "--steps", type=int, default=90, help="fine-tuning budget in optimizer steps (of 4 x 128 tokens)"
    )
    parser.add_argument(
        "--minutes", type=float, default=6.0, help="and at most this many wall-clock minutes (whichever comes first)"
    )
    parser.add_argument("--seed", type=int, default=1337, help="seed for the split, training and sampling")
    parser.add_argument("--eval-samples", type=int, default=16, help="evaluation samples per label")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=steps.GUIDANCE_SCALE,
        help="guidance of the label reviews away from the other label's sentence, base and fine-tuned alike; 1 = off",
    )
    parser.add_argument("--fresh", action="store_true", help="prepare, train and evaluate again even if done")
    parser.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip both evaluations")
    scratch = parser.add_argument_group("from-scratch comparison")
    scratch.add_argument(
        "--compare-scratch", action="store_true", help="also train a GPT from scratch and add it to the comparison"
    )
    scratch.add_argument("--scratch-data", type=Path, default=Path("data/imdb"), help="its dataset (own tokenizer)")
    scratch.add_argument("--scratch-out", type=Path, default=Path("runs/demo-scratch"), help="its run folder")
    scratch.add_argument("--scratch-preset", default="small", choices=tuple(MODEL_PRESETS), help="its model size")
    scratch.add_argument("--scratch-minutes", type=float, default=5.0, help="its training budget in minutes")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    for flag, value in (("--minutes", args.minutes), ("--scratch-minutes", args.scratch_minutes)):
        if value <= 0:
            raise AigcError(f"{flag} must be > 0, got {value}")
    if args.steps < 1:
        raise AigcError(f"--steps must be >= 1, got {args.steps}")
    if args.eval_samples < 1:
        raise AigcError(f"--eval-samples must be >= 1, got {args.eval_samples}")
    SampleConfig(guidance_scale=args.guidance_scale)  # its range check: one clear error before any work
    clock = steps.Clock()
    total = (7 if args.evaluate else 5) + (1 if args.compare_scratch else 0)
    step = iter(range(1, total + 1))

    _step(next(step), total, f"pull the base {args.base}")
    base = clock.time("pull", steps.pull_base, args.base)
    _step(next(step), total, f"prepare {args.source} with the base's tokenizer -> {args.data}")
    clock.time("prepare", steps.prepare, args.source, args.data, base, args.seed, args.fresh)
    evaluations: dict[str, dict] = {}
    if args.evaluate:
        _step(next(step), total, f"evaluate the base {base}")
        evaluations["base"] = clock.time("evaluate base", steps.evaluate_base, base, args)
    _step(next(step), total, f"LoRA fine-tune for {args.steps} steps (at most {args.minutes:g} minutes) -> {args.out}")
    clock.time("fine-tune", steps.finetune, base, args)
    _step(next(step), total, "generate reviews and continuations")
    samples = clock.time("generate", steps.generate_demo_samples, args.out, args.seed, args.guidance_scale)
    if args.evaluate:
        _step(next(step), total, f"evaluate the fine-tuned run {args.out} (the base judges its samples)")
        evaluations["fine-tuned"] = clock.time("evaluate fine-tuned", steps.evaluate_finetuned, base, args)
    if args.compare_scratch:
        _step(next(step), total, f"from scratch: a {args.scratch_preset} GPT for {args.scratch_minutes:g} minutes")
        scratch = clock.time("from scratch", steps.scratch_run, base, args)
        if scratch is not None:
            evaluations["scratch"] = scratch
    _step(next(step), total, "write the report")
    md, html = clock.time("report", steps.write_demo_report, args.out, samples, evaluations, clock)
    _finish(args, md, html, clock)
    return 0


def _finish(args: argparse.Namespace, md: Path, html: Path, clock: steps.Clock) -> None:
    _say(f"\ndemo finished in {clock.total() / 60:.1f} minutes ({clock.summary()}).")
    _say(f"report: {html}  (Markdown: {md})")
    _say(f'more text: aigc generate {args.out} --label pos -n 3   or   aigc generate {args.out} --prompt "The plot"')
    _say(f"serve it:  aigc serve {args.out}   then open http://127.0.0.1:8000/")


def _step(i: int, total: int, what: str) -> None:
    _say(f"[{i}/{total}] {what}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
