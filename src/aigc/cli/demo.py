"""`aigc demo`: parse the flags, run `aigc.demo.Demo`'s steps in order and print their progress.

The demo: fine-tune the built-in pretrained base on IMDb, end to end, in about 10 minutes on a CPU.

pull the base (SmolLM2-135M) → prepare IMDb with its tokenizer and <|pos|>/<|neg|> → evaluate the base →
LoRA fine-tune for --steps (or --minutes) → three positive and three negative reviews plus two fixed continuations →
evaluate the fine-tuned run (the base judging its samples) → RUN/report.md and .html with the base and
the fine-tuned model side by side and the demo's targets checked. `--compare-scratch` also trains the
`small` GPT from scratch (with a tokenizer of its own) and adds it to the comparison.
Re-running reuses the prepared data, a finished run and finished evaluations unless --fresh.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from collections.abc import Iterator
from pathlib import Path

from aigc.artifacts.run import BUILT_IN_MODELS
from aigc.config import MODEL_PRESETS
from aigc.demo.steps import GUIDANCE_SCALE, Clock, Demo, DemoOptions


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
        "--steps", type=int, default=180, help="fine-tuning budget in optimizer steps (of 8 x 128 tokens)"
    )
    parser.add_argument(
        "--minutes", type=float, default=4.5, help="and at most this many wall-clock minutes (whichever comes first)"
    )
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=8.0,
        help="the whole demo's target: on a slow CPU the fine-tune gets fewer minutes, what the other steps leave",
    )
    parser.add_argument("--seed", type=int, default=1337, help="seed for the split, training and sampling")
    parser.add_argument("--eval-samples", type=int, default=16, help="evaluation samples per label")
    parser.add_argument(
        "--guidance-scale",
        type=float,
        default=GUIDANCE_SCALE,
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
    names = [f.name for f in dataclasses.fields(DemoOptions)]
    options = DemoOptions(**{name: getattr(args, name) for name in names})  # checks every value first
    demo = Demo(options, say=_detail)
    md, html = demo.run(on_step=_say, training=_progress)
    _finish(options, md, html, demo.clock)
    return 0


@contextlib.contextmanager
def _progress(config) -> Iterator:
    """The training progress of `aigc train` (bar, evaluations, samples) for one training step."""
    # Deferred: tqdm and the training events load only when a demo trains.
    from aigc.cli.train import Progress

    progress = Progress(sample_tokens=config.sample_tokens, seed=config.seed)
    try:
        yield progress
    finally:
        progress.close()


def _finish(options: DemoOptions, md: Path, html: Path, clock: Clock) -> None:
    _say(f"\ndemo finished in {clock.total() / 60:.1f} minutes ({clock.summary()}).")
    _say(f"report: {html}  (Markdown: {md})")
    out = options.out
    _say(f'more text: aigc generate {out} --label pos -n 3   or   aigc generate {out} --prompt "The plot"')
    _say(f"serve it:  aigc serve {out}   then open http://127.0.0.1:8000/")


def _detail(message: str) -> None:
    _say(f"  {message}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
