"""The steps of `aigc demo` (cli/demo.py runs them in order): each one prints its progress and is reused
when its result already exists, unless --fresh."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aigc.artifacts.run import BUILT_IN_MODELS, CONFIG, EVAL, read_run_config
from aigc.config import (
    FINETUNE_DEFAULTS,
    EvalConfig,
    PrepareConfig,
    SampleConfig,
    finetune_train_config,
    to_dict,
    train_preset,
)
from aigc.errors import AigcError
from aigc.fsutil import write_json

CONTINUATION_PROMPTS = ("This is an example of artificial intelligence", "这是一个关于人工智能的例子")
REVIEWS_PER_LABEL = 3
# Each label's reviews start with a sentiment sentence after its control token: a few minutes of LoRA
# teach the new <|pos|>/<|neg|> rows too little to steer a whole review alone (docs/demo.md has the figures).
# The base draws from the same sentences, so their samples compare; judges see only what follows them.
LABEL_PROMPTS = {"pos": "I loved this movie.", "neg": "I hated this movie."}
# Classifier-free guidance (aigc.guidance) away from the other label and its sentence, for the base and
# the fine-tuned run alike: the sentence alone leaves about a third of the reviews drifting to the
# other sentiment (docs/generate.md has the figures for scales 1-5).
GUIDANCE_SCALE = 3.0
BASE_EVAL = "base.json"  # RUN/eval/base.json: the base's evaluation on the same documents
SCRATCH_EVAL = "scratch.json"  # RUN/eval/scratch.json: the from-scratch run's, with --compare-scratch
# The same sampling for every evaluation, so the base, the fine-tuned and the scratch run compare. At
# least 32 tokens, as for the printed reviews: a guided sample that ends right after its sentence is
# no review, and the sentiment judge, which never sees the sentence, can only guess at it.
EVAL_SAMPLING = SampleConfig(
    temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1, guidance_scale=GUIDANCE_SCALE, min_new_tokens=32
)
# At least 32 tokens: guided reviews sometimes end right after their sentence.
REVIEW_SAMPLING = SampleConfig(
    max_new_tokens=120,
    min_new_tokens=32,
    temperature=0.8,
    top_k=50,
    top_p=0.95,
    repetition_penalty=1.1,
    guidance_scale=GUIDANCE_SCALE,
)
CONTINUATION_SAMPLING = SampleConfig(max_new_tokens=60, temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.1)


class Clock:
    """Wall-clock seconds of each demo step, for the progress lines and the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def time(self, name: str, function: Callable, *args: Any) -> Any:
        start = time.perf_counter()
        result = function(*args)
        self.seconds[name] = time.perf_counter() - start
        say(f"  ({name}: {self.seconds[name]:.0f} s)")
        return result

    def total(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> str:
        return ", ".join(f"{name} {s:.0f} s" for name, s in self.seconds.items())


def pull_base(base: str) -> Path:
    """The base's run folder: a built-in name is converted from its installed package once."""
    if base in BUILT_IN_MODELS and not Path(base).exists():
        # Deferred: pulling imports the GGUF reader, which only this step needs.
        from aigc.interop.pretrained import pull

        folder = pull(base)
        say(f"  {base}: {folder}")
        return folder
    folder = Path(base)
    if not (folder / CONFIG).is_file():
        raise AigcError(
            f"--base {base} is neither a built-in model ({', '.join(BUILT_IN_MODELS)}) nor a run folder; "
            "pass one of those"
        )
    return folder


def prepare(source: str, data: Path, base: Path, seed: int, fresh: bool) -> None:
    """`aigc prepare SOURCE --tokenizer BASE`: the base's tokenizer plus a control token per label."""
    # Deferred: a slow import that only this path needs.
    from aigc.artifacts.dataset import read_dataset_info
    from aigc.data.prepare import prepare_dataset
    from aigc.tokenizer import Tokenizer

    if (data / "dataset.json").is_file() and not fresh:
        fingerprint = Tokenizer.load(base / "tokenizer.json").vocab_fingerprint()
        if read_dataset_info(data).get("base_tokenizer_fingerprint") != fingerprint:
            raise AigcError(
                f"{data} was prepared with another tokenizer than the base {base}'s; pass --fresh to prepare "
                "it again, or another --data"
            )
        say(f"  reusing {data} (pass --fresh to prepare it again)")
        return
    builtin = source in ("imdb", "rotten-tomatoes")
    config = PrepareConfig(seed=seed, overwrite=fresh, label_column=None if builtin else "label", tokenizer=str(base))
    info = prepare_dataset(source, data, config, progress=lambda m: say(f"  {m}"))
    splits = ", ".join(f"{name} {s['tokens']:,} tokens" for name, s in info["splits"].items())
    say(f"  {splits}; {info['bytes_per_token']:.2f} bytes/token")


def eval_config(args: argparse.Namespace, samples: int) -> EvalConfig:
    """Small enough for a CPU: a 135M model decodes ~100 tokens/s at batch 16 on a shared 2-core CPU."""
    return EvalConfig(
        lm_docs=12, prompts=8, samples=samples, max_new_tokens=96, classifier_docs=6000, batch_size=16, seed=args.seed
    )


def evaluate_base(base: Path, args: argparse.Namespace) -> dict:
    """The base on the same held-out documents (its tokenizer lacks the control tokens: they are
    left out) and as many free samples as the fine-tuned run draws in all."""
    saved = args.out / EVAL / BASE_EVAL
    if saved.is_file() and not args.fresh and _same_sampling(saved, args):
        say(f"  reusing {saved}")
        return read_json(saved)
    prompts = _label_prompts(args.data)
    samples = args.eval_samples if prompts else args.eval_samples * max(1, len(_dataset_labels(args.data)))
    return _evaluate(base, eval_config(args, samples), args, data=args.data, judge=None, prompts=prompts)


def finetune(base: Path, args: argparse.Namespace) -> None:
    """LoRA (the defaults for an imported base) for --steps, or --minutes if that comes first; an
    unfinished run continues. A step budget, not a time budget alone: the same steps give the same run
    on a busy or an idle machine (on the development CPU, 73 steps in 3.5 busy minutes gave the fine-tuned
    run 84-88 % control accuracy, 81 steps 91-94 %)."""
    resume = (args.out / CONFIG).is_file() and not args.fresh
    if resume:
        say(f"  {args.out} exists: continuing it if unfinished (pass --fresh to train again)")
    seq_len = min(FINETUNE_DEFAULTS["seq_len"], read_run_config(base).model.block_size)
    config = finetune_train_config(
        max_steps=args.steps, minutes=args.minutes, seed=args.seed, seq_len=seq_len, eval_every=40, sample_tokens=24
    )
    _train(args.data, args.out, config, init_from=None if resume else base, resume=resume, fresh=args.fresh)


def _train(data: Path, out: Path, config, *, init_from: Path | None, resume: bool, fresh: bool, preset="small"):
    # Deferred: a slow import that only this path needs.
    from aigc.cli.train import Progress
    from aigc.train.loop import train

    progress = Progress(sample_tokens=config.sample_tokens, seed=config.seed)
    try:
        train(
            None if resume else data,
            out,
            None,
            None if resume else config,
            preset=preset,
            resume=resume,
            init_from=init_from,
            overwrite=fresh,
            on_event=progress,
        )
    finally:
        progress.close()


def generate_demo_samples(run_dir: Path, seed: int, guidance_scale: float) -> list[dict]:
    """Three reviews per label and a continuation of each fixed prompt, decoded as one batch."""
    # Deferred: a slow import that only this path needs.
    from aigc.artifacts.device import pick_device
    from aigc.evaluate.run import for_inference, generate_all
    from aigc.generate import Request
    from aigc.models import load_run

    run = for_inference(load_run(run_dir, device=pick_device("auto")))
    requests = []
    for label in run.labels:
        others = [other for other in run.labels if other != label]
        negative = others[0] if len(others) == 1 else None  # guided away from the other label (aigc.guidance)
        for _ in range(REVIEWS_PER_LABEL):
            # A distinct seed per sample: with shared seeds the labels' samples start alike.
            config = dataclasses.replace(REVIEW_SAMPLING, seed=seed + len(requests), guidance_scale=guidance_scale)
            request = Request(LABEL_PROMPTS.get(label, ""), label, config, negative_label=negative)
            requests.append(dataclasses.replace(request, negative_prompt=LABEL_PROMPTS.get(negative, "")))
    for prompt in CONTINUATION_PROMPTS:
        requests.append(Request(prompt=prompt, config=_seeded(CONTINUATION_SAMPLING, seed + len(requests))))
    completions = generate_all(run, requests, batch_size=len(requests))
    samples = [dict(label=r.label or "", prompt=r.prompt, text=c.text.strip()) for r, c in zip(requests, completions)]
    write_json(run_dir / "samples.json", samples)
    for s in samples:
        shown = f"{s['prompt']} {s['text']}" if s["prompt"] else s["text"]
        say(f"  [{s['label'] or 'continuation'}] {' '.join(shown.split())[:300]}")
    return samples


def evaluate_finetuned(base: Path, args: argparse.Namespace) -> dict:
    """The fine-tuned run with the demo's evaluation sizes; the base judges the fluency of its samples."""
    saved = args.out / EVAL / "metrics.json"
    trained = max((p.stat().st_mtime for p in args.out.glob("*.safetensors")), default=0.0)
    if saved.is_file() and not args.fresh and saved.stat().st_mtime > trained and _same_sampling(saved, args):
        say(f"  reusing {saved} (newer than the weights)")
        return read_json(saved)
    prompts = _label_prompts(args.data)
    return _evaluate(args.out, eval_config(args, args.eval_samples), args, data=None, judge=base, prompts=prompts)


def scratch_run(base: Path, args: argparse.Namespace) -> dict | None:
    """From scratch: prepare with a tokenizer of its own, train a small GPT, evaluate it."""
    # Deferred: a slow import that only this path needs.
    from aigc.data.prepare import prepare_dataset

    data, out = args.scratch_data, args.scratch_out
    if (data / "dataset.json").is_file() and not args.fresh:
        say(f"  reusing {data}")
    else:
        builtin = args.source in ("imdb", "rotten-tomatoes")
        config = PrepareConfig(seed=args.seed, overwrite=args.fresh, label_column=None if builtin else "label")
        prepare_dataset(args.source, data, config, progress=lambda m: say(f"  {m}"))
    resume = (out / CONFIG).is_file() and not args.fresh
    config = train_preset(args.scratch_preset, minutes=args.scratch_minutes, seed=args.seed, eval_every=100)
    _train(data, out, config, init_from=None, resume=resume, fresh=args.fresh, preset=args.scratch_preset)
    if not args.evaluate:
        return None
    config = eval_config(args, args.eval_samples)
    result = _evaluate(out, config, args, data=None, judge=base, prompts=_label_prompts(data))
    write_json(out / EVAL / "metrics.json", result)
    return result


def _evaluate(run_dir: Path, config: EvalConfig, args, *, data: Path | None, judge: Path | None, prompts) -> dict:
    # Deferred: a slow import that only this path needs.
    from aigc.evaluate.run import evaluate_run

    return evaluate_run(
        run_dir,
        config=config,
        sampling=_eval_sampling(args),
        data=data,
        judge=judge,
        progress=lambda m: say(f"  {m}"),
        sample_prompts=prompts,
    )


def _eval_sampling(args: argparse.Namespace) -> SampleConfig:
    return dataclasses.replace(EVAL_SAMPLING, guidance_scale=args.guidance_scale)


def _same_sampling(saved: Path, args: argparse.Namespace) -> bool:
    """Whether a saved evaluation was sampled as this demo samples (else it is redone): the same
    --guidance-scale and the same settings, bar the length and seed that each evaluation sets."""
    stored = read_json(saved).get("sampling", {})
    wanted = to_dict(_eval_sampling(args))
    return all(stored.get(key) == value for key, value in wanted.items() if key not in ("max_new_tokens", "seed"))


def _label_prompts(data: Path) -> dict[str, str]:
    """The sentiment sentence of each of the dataset's labels that has one."""
    return {label: LABEL_PROMPTS[label] for label in _dataset_labels(data) if label in LABEL_PROMPTS}


def _dataset_labels(data: Path) -> list[str]:
    # Deferred: a slow import that only this path needs.
    from aigc.artifacts.dataset import read_dataset_info

    return list(read_dataset_info(data).get("labels") or [])


def _seeded(config: SampleConfig, seed: int) -> SampleConfig:
    return dataclasses.replace(config, seed=seed)


def write_demo_report(out: Path, samples: list[dict], evaluations: dict[str, dict], clock: Clock):
    """RUN/report.md and .html: samples, the side-by-side comparison, the targets and the timings."""
    # Deferred: slow imports that only this path needs.
    from aigc.cli.demo_report import report_sections
    from aigc.report import write_report

    for name, file in (("base", BASE_EVAL), ("fine-tuned", "metrics.json"), ("scratch", SCRATCH_EVAL)):
        if name in evaluations:
            write_json(out / EVAL / file, evaluations[name])
    sections = report_sections(out, samples, evaluations, clock.seconds)
    return write_report(out, sections, evaluation=evaluations.get("fine-tuned"))


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
