"""`aigc demo`: the main job on the built-in IMDb corpus, end to end, in under 10 minutes on a laptop CPU.

prepare (with sentiment labels) → train the `small` GPT on a time budget → curves → three positive and
three negative reviews plus a continuation of a fixed prompt → evaluation → RUN/report.md and .html.
Re-running reuses the prepared data and a finished run unless --fresh.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from aigc.config import (
    MODEL_PRESETS,
    EvalConfig,
    PrepareConfig,
    SampleConfig,
    train_preset,
)
from aigc.errors import AigcError
from aigc.fsutil import write_json

CONTINUATION_PROMPT = "This is an example of artificial intelligence"
REVIEWS_PER_LABEL = 3


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="the whole pipeline on the built-in IMDb reviews, in under 10 minutes on a CPU",
        description=(
            "Prepare the IMDb reviews (with pos/neg labels), train a small GPT for --minutes, draw the "
            "training curves, generate positive and negative reviews, evaluate the run and write "
            "RUN/report.md and RUN/report.html. Re-running reuses the data and a finished run."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--source",
        default="imdb",
        help="corpus: imdb, rotten-tomatoes, or a CSV with `text` and `label` columns (for quick trials)",
    )
    parser.add_argument(
        "--data", type=Path, default=Path("data/imdb"), help="prepared dataset folder (made if missing)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder")
    parser.add_argument("--preset", default="small", choices=tuple(MODEL_PRESETS), help="model size preset")
    parser.add_argument("--minutes", type=float, default=5.0, help="training budget in wall-clock minutes")
    parser.add_argument("--seed", type=int, default=1337, help="seed for the split, training and sampling")
    parser.add_argument("--fresh", action="store_true", help="prepare and train again even if results exist")
    parser.add_argument("--no-eval", dest="evaluate", action="store_false", help="skip the evaluation step")
    parser.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    if args.minutes <= 0:
        raise AigcError(f"--minutes must be > 0, got {args.minutes}")
    started = time.perf_counter()
    steps = 6 if args.evaluate else 5
    _step(1, steps, f"prepare {args.source} -> {args.data}")
    _prepare(args)
    _step(2, steps, f"train a {args.preset} GPT for {args.minutes:g} minutes -> {args.out}")
    _train(args)
    _step(3, steps, "draw the training curves")
    # Deferred: a slow import that only this path needs.
    from aigc.plots import plot_runs

    plots = plot_runs([args.out])
    _say("  " + ", ".join(str(p) for p in plots))
    _step(4, steps, "generate reviews")
    samples = _generate(args.out, args.seed)
    evaluation = None
    if args.evaluate:
        _step(5, steps, "evaluate the run")
        evaluation = _evaluate(args.out, args.seed)
    _step(steps, steps, "write the report")
    # Deferred: a slow import that only this path needs.
    from aigc.report import write_report

    md, html = write_report(args.out, [("Demo samples", _samples_markdown(samples))], evaluation=evaluation)
    _finish(args, md, html, time.perf_counter() - started)
    return 0


def _prepare(args: argparse.Namespace) -> None:
    # Deferred: a slow import that only this path needs.
    from aigc.data.prepare import prepare_dataset

    if (args.data / "dataset.json").is_file() and not args.fresh:
        _say(f"  reusing {args.data} (pass --fresh to prepare it again)")
        return
    builtin = args.source in ("imdb", "rotten-tomatoes")
    config = PrepareConfig(seed=args.seed, overwrite=args.fresh, label_column=None if builtin else "label")
    info = prepare_dataset(args.source, args.data, config, progress=lambda m: _say(f"  {m}"))
    splits = ", ".join(f"{name} {s['tokens']:,} tokens" for name, s in info["splits"].items())
    _say(f"  {splits}; {info['bytes_per_token']:.2f} bytes/token; {info['elapsed_s']:.1f} s")


def _train(args: argparse.Namespace) -> None:
    # Deferred: a slow import that only this path needs.
    from aigc.cli.train import Progress
    from aigc.train.loop import train

    resume = (args.out / "config.json").is_file() and not args.fresh
    if resume:
        _say(f"  {args.out} exists: continuing it if unfinished (pass --fresh to train again)")
    config = train_preset(args.preset, minutes=args.minutes, seed=args.seed, eval_every=100)
    progress = Progress(sample_tokens=32, seed=args.seed)
    try:
        train(
            None if resume else args.data,
            args.out,
            None,
            None if resume else config,
            preset=args.preset,
            resume=resume,
            overwrite=args.fresh,
            on_event=progress,
        )
    finally:
        progress.close()


def _generate(run_dir: Path, seed: int) -> list[tuple[str, str, str]]:
    """(label, prompt, text) for three reviews per label and one continuation of a fixed prompt."""
    # Deferred: a slow import that only this path needs.
    from aigc.artifacts.device import pick_device
    from aigc.generate import Request, generate
    from aigc.models import load_run

    run = load_run(run_dir, device=pick_device("auto"))
    requests = []
    for label in run.labels:
        for _ in range(REVIEWS_PER_LABEL):
            # A distinct seed per sample: with shared seeds the labels' samples start alike.
            config = SampleConfig(
                max_new_tokens=160,
                temperature=0.8,
                top_k=50,
                top_p=0.95,
                repetition_penalty=1.1,
                seed=seed + len(requests),
            )
            requests.append(Request(label=label, config=config))
    requests.append(
        Request(
            prompt=CONTINUATION_PROMPT, config=SampleConfig(max_new_tokens=80, temperature=0.7, top_k=50, seed=seed)
        )
    )
    completions = generate(run.model, run.tokenizer, requests)
    samples = [(r.label or "", r.prompt, c.text.strip()) for r, c in zip(requests, completions)]
    write_json(run_dir / "samples.json", [dict(label=label, prompt=p, text=t) for label, p, t in samples])
    for label, prompt, text in samples:
        shown = f"{prompt} {text}" if prompt else text
        _say(f"  [{label or 'continuation'}] {' '.join(shown.split())[:300]}")
    return samples


def _evaluate(run_dir: Path, seed: int) -> dict:
    # Deferred: a slow import that only this path needs.
    from aigc.evaluate.run import evaluate_run

    config = EvalConfig(seed=seed)
    sampling = SampleConfig(max_new_tokens=config.max_new_tokens, temperature=0.8, top_k=50, top_p=0.95)
    result = evaluate_run(run_dir, config=config, sampling=sampling, progress=lambda m: _say(f"  {m}"))
    write_json(run_dir / "eval" / "metrics.json", result)
    return result


def _samples_markdown(samples: list[tuple[str, str, str]]) -> str:
    parts = []
    for label, prompt, text in samples:
        title = f"**{label}** review" if label else f"**continuation** of “{prompt}”"
        body = f"{prompt} {text}" if prompt else text
        parts.append(f"{title}\n\n> {' '.join(body.split())}")
    return "\n\n".join(parts)


def _finish(args: argparse.Namespace, md: Path, html: Path, seconds: float) -> None:
    _say(f"\ndemo finished in {seconds / 60:.1f} minutes.")
    _say(f"report: {html}  (Markdown: {md})")
    _say(f'more text: aigc generate {args.out} --label pos -n 3   or   aigc generate {args.out} --prompt "The plot"')
    _say(f"serve it:  aigc serve {args.out}   then open http://127.0.0.1:8000/")


def _step(i: int, total: int, what: str) -> None:
    _say(f"[{i}/{total}] {what}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
