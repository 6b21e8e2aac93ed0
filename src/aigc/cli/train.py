"""`aigc train`: pretrain, resume or fine-tune a model; a progress bar and per-label samples on stderr."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from aigc.cli.args import add_dataclass_args, dataclass_from_args, given_options
from aigc.config import (
    FINETUNE_DEFAULTS,
    MODEL_PRESETS,
    TRAIN_PRESETS,
    ModelConfig,
    SampleConfig,
    TrainConfig,
    finetune_train_config,
    model_preset,
    train_preset,
)
from aigc.errors import AigcError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a GPT or LSTM on a prepared dataset (or resume / fine-tune a run)",
        description=(
            "Train a model on a dataset made by `aigc prepare` and write the run folder --out (config, "
            "tokenizer, weights, training state, metrics.jsonl, plots). Budget with --max-steps, "
            "--max-tokens or --minutes. `--resume RUN` continues a run exactly; `--init-from RUN` "
            "fine-tunes one on new data (an imported model such as smollm2-135m with LoRA by default: "
            + _settings(FINETUNE_DEFAULTS)
            + "; --lora-rank 0 for full fine-tuning). Distributed: `torchrun --nproc_per_node=N -m aigc train ...`. "
            "A preset also sets training options where no flag does: "
            + "; ".join(f"{name}: {_settings(values)}" for name, values in TRAIN_PRESETS.items() if values)
            + ". The defaults shown below are those of the other presets."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", type=Path, help="prepared dataset folder (optional with --resume)")
    parser.add_argument("--out", type=Path, help="run folder to create (not needed with --resume)")
    parser.add_argument("--preset", choices=tuple(MODEL_PRESETS), help="model size preset (default: small)")
    parser.add_argument("--resume", type=Path, metavar="RUN", help="continue this run from its last checkpoint")
    parser.add_argument("--init-from", type=Path, metavar="RUN", help="fine-tune: start from this run's weights")
    parser.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or samples (errors still show)")
    add_dataclass_args(parser, ModelConfig, exclude=("vocab_size",))
    add_dataclass_args(parser, TrainConfig)
    parser.set_defaults(handler=handle)


def _settings(values: dict) -> str:
    return ", ".join(
        f"--{key.replace('_', '-')} {value if isinstance(value, str) else f'{value:g}'}"
        for key, value in values.items()
    )


def _configs(args: argparse.Namespace) -> tuple[ModelConfig | None, TrainConfig]:
    """Model and training configs from the flags the user gave (None = decided by the library)."""
    # Deferred: a slow import that only this path needs.
    from aigc.artifacts.run import read_run_config

    model_given = given_options(args, ModelConfig)
    model = None
    if args.preset or model_given:
        if args.resume:
            raise AigcError(f"--resume keeps the model of {args.resume}; drop the model options and --preset")
        model = model_preset(args.preset or "small", **model_given)
    if args.resume:
        saved = read_run_config(args.resume).train
        return model, dataclasses.replace(saved, **given_options(args, TrainConfig))
    if args.init_from:
        if "imported_from" in read_run_config(args.init_from).extra:  # a pretrained base: LoRA, short sequences
            return model, finetune_train_config(**given_options(args, TrainConfig))
        return model, dataclass_from_args(args, TrainConfig)
    return model, train_preset(args.preset or "small", **given_options(args, TrainConfig))


def handle(args: argparse.Namespace) -> int:
    # Deferred: a slow import that only this path needs.
    from aigc.train.events import TrainingInterrupted
    from aigc.train.loop import train

    if args.resume and args.out and args.out.resolve() != args.resume.resolve():
        raise AigcError("--resume RUN continues RUN in place; drop --out or make it the same folder")
    if args.resume and args.init_from:
        raise AigcError(
            "--resume and --init-from exclude each other: resume continues a run, init-from starts a new one"
        )
    out = args.resume or args.out
    if out is None:
        raise AigcError("--out is required: the run folder to create (or --resume RUN)")
    model_config, train_config = _configs(args)
    progress = None if args.quiet else Progress(train_config.sample_tokens, train_config.seed)
    try:
        train(
            args.data,
            out,
            model_config,
            train_config,
            preset=args.preset or "small",
            resume=args.resume is not None,
            init_from=args.init_from,
            overwrite=args.overwrite,
            on_event=progress,
        )
    except TrainingInterrupted as stop:
        if progress:
            progress.close()  # before the message, so the bar does not redraw over it
        print(
            f"aigc train: interrupted at step {stop.step}; checkpoint saved. Continue with: aigc train "
            f"--resume {stop.run_dir}",
            file=sys.stderr,
        )
        return 130
    finally:
        if progress:
            progress.close()
    return 0


def draw_samples(model, tokenizer, max_tokens: int, seed: int) -> dict[str, str]:
    """One short sample per label (or one unconditioned sample): what the model writes so far."""
    # Deferred: a slow import that only this path needs.
    from aigc.generate import Request, generate

    labels = tokenizer.labels or (None,)
    config = SampleConfig(max_new_tokens=max_tokens, temperature=0.8, top_k=50, seed=seed)
    completions = generate(model, tokenizer, [Request(label=label, config=config) for label in labels])
    return {label or "sample": c.text for label, c in zip(labels, completions)}


class Progress:
    """The on_event callback of the CLI: a tqdm bar, one line per evaluation, per-label samples."""

    def __init__(self, sample_tokens: int, seed: int):
        self.sample_tokens, self.seed = sample_tokens, seed
        self.bar = None

    def __call__(self, event) -> None:
        # Deferred: a slow import that only this path needs.
        from aigc.train import events

        if isinstance(event, events.TrainStart):
            self._start(event)
        elif isinstance(event, events.TrainStep):
            self._step(event)
        elif isinstance(event, events.TrainEval):
            self._eval(event)
        elif isinstance(event, events.TrainEnd):
            self._end(event)

    def _start(self, e) -> None:
        # Deferred: a slow import that only this path needs.
        from tqdm import tqdm

        what = "resuming" if e.resumed else f"fine-tuning {e.init_from}" if e.init_from else "training"
        _say(
            f"{what} ({e.description}) on {e.device}, {e.dtype}"
            + (f", {e.world_size} processes" if e.world_size > 1 else "")
            + f" -> {e.run_dir}"
        )
        for note in e.notes:
            _say(f"note: {note}")
        self.bar = tqdm(
            total=100,
            initial=0,
            file=sys.stderr,
            unit="%",
            dynamic_ncols=True,
            bar_format="{l_bar}{bar}| {n:.0f}% [{elapsed}<{remaining}{postfix}]",
        )

    def _step(self, e) -> None:
        if self.bar is None:
            return
        self.bar.n = round(e.progress * 100, 1)
        self.bar.set_postfix_str(f"step {e.step}, loss {e.loss:.3f}, {e.tokens_per_s:,.0f} tok/s", refresh=False)
        self.bar.refresh()

    def _eval(self, e) -> None:
        m = e.metrics
        lines = [
            f"step {m['step']}: train loss {m['train_loss']:.3f}, val loss {m['val_loss']:.3f}, "
            f"val bpb {m['val_bpb']:.3f}, val acc {m['val_acc']:.1%}, {m['tokens_per_s']:,.0f} tok/s"
            + (" (best)" if e.is_best else "")
        ]
        if self.sample_tokens:
            samples = draw_samples(e.model, e.tokenizer, self.sample_tokens, self.seed)
            lines += [f"  [{label}] {' '.join(text.split())}" for label, text in samples.items()]
        for line in lines:
            _say(line, self.bar)

    def _end(self, e) -> None:
        self.close()
        if e.reason == "already done":
            _say(
                f"{e.run_dir} already reached its budget at step {e.step}; raise "
                "--max-steps/--max-tokens/--minutes to go on"
            )
        else:
            _say(
                f"done ({e.reason.replace('_', '-')}) at step {e.step}; run saved in {e.run_dir}, curves in "
                f"{e.run_dir / 'plots'}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _say(line: str, bar=None) -> None:
    if bar is not None:
        bar.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr)
