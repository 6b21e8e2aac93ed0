"""The steps of `aigc demo`, in the order `Demo` runs them; each is reused when its result already
exists, unless `fresh`. Progress goes to the `say` callback and training events to `on_event` (the
CLI prints both); nothing here prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aigc.artifacts.dataset import read_dataset_info
from aigc.artifacts.run import BUILT_IN_MODELS, CONFIG, EVAL, read_run_config
from aigc.config import (
    FINETUNE_DEFAULTS,
    MODEL_PRESETS,
    EvalConfig,
    PrepareConfig,
    SampleConfig,
    TrainConfig,
    finetune_train_config,
    to_dict,
    train_preset,
)
from aigc.errors import AigcError
from aigc.fsutil import write_json
from aigc.train.events import EventCallback

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
# Sequences of 128 tokens per fine-tuning step: 180 steps are 184,320 tokens, 4x the 90 steps of 4 x 128
# fp32 fine-tuned before bf16 (--dtype auto) sped LoRA up; the minutes cap stops it sooner on a busy CPU.
FINETUNE_BATCH = 8
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


# The demo's time on a slow CPU (docs/demo.md): the fine-tuned run's evaluation takes about this many
# times the base's, and generation plus the fine-tune's model load, last evaluation and checkpoint about
# AROUND_FINETUNE_S (20 s and 23 s on a 2-core AVX2 EPYC, 2026-12-04); the cap never goes below a minute.
FINETUNED_EVAL_RATIO = 1.4
AROUND_FINETUNE_S = 50.0
MIN_FINETUNE_MINUTES = 1.0


@dataclass(frozen=True)
class DemoOptions:
    """What `aigc demo` does; the CLI's flags (and their help) map one to one onto these fields."""

    base: str = BUILT_IN_MODELS[0]
    source: str = "imdb"
    data: Path = Path("data/imdb-smol")
    out: Path = Path("runs/demo")
    steps: int = 180
    minutes: float = 4.5
    budget_minutes: float = 8.0
    seed: int = 1337
    eval_samples: int = 16
    guidance_scale: float = GUIDANCE_SCALE
    fresh: bool = False
    evaluate: bool = True
    compare_scratch: bool = False
    scratch_data: Path = Path("data/imdb")
    scratch_out: Path = Path("runs/demo-scratch")
    scratch_preset: str = "small"
    scratch_minutes: float = 5.0

    def __post_init__(self) -> None:
        budgets = (("--minutes", self.minutes), ("--budget-minutes", self.budget_minutes))
        for flag, value in (*budgets, ("--scratch-minutes", self.scratch_minutes)):
            if value <= 0:
                raise AigcError(f"{flag} must be > 0, got {value}")
        if self.steps < 1:
            raise AigcError(f"--steps must be >= 1, got {self.steps}")
        if self.eval_samples < 1:
            raise AigcError(f"--eval-samples must be >= 1, got {self.eval_samples}")
        if self.scratch_preset not in MODEL_PRESETS:
            raise AigcError(f"--scratch-preset {self.scratch_preset!r}: choose one of {', '.join(MODEL_PRESETS)}")
        SampleConfig(guidance_scale=self.guidance_scale)  # its range check: one clear error before any work


class Clock:
    """Wall-clock seconds of each demo step, for the progress lines and the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.started = time.perf_counter()

    def time(self, name: str, function: Callable, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self.seconds[name] = time.perf_counter() - start
        return result

    def total(self) -> float:
        return time.perf_counter() - self.started

    def summary(self) -> str:
        return ", ".join(f"{name} {s:.0f} s" for name, s in self.seconds.items())


def _quiet(message: str) -> None:
    """The default `say`: the library itself never prints."""


def _no_events(config: TrainConfig) -> contextlib.AbstractContextManager[EventCallback | None]:
    return contextlib.nullcontext(None)


class Demo:
    """The demo's steps over one set of options; `say` receives a line of progress at a time."""

    def __init__(self, options: DemoOptions, say: Callable[[str], None] = _quiet):
        self.options, self.say = options, say
        self.clock = Clock()

    def run(
        self,
        *,
        on_step: Callable[[str], None] = _quiet,
        training: Callable[[TrainConfig], contextlib.AbstractContextManager[EventCallback | None]] = _no_events,
    ) -> tuple[Path, Path]:
        """Every step in order; returns the report's paths. `on_step` gets "[i/n] what" as each step
        starts; `training(config)` gives the event callback of a training step (as a context)."""
        o = self.options
        total = (7 if o.evaluate else 5) + (1 if o.compare_scratch else 0)
        numbers = iter(range(1, total + 1))

        def step(name: str, what: str, function: Callable, *args: Any) -> Any:
            on_step(f"[{next(numbers)}/{total}] {what}")
            result = self.clock.time(name, function, *args)
            self.say(f"({name}: {self.clock.seconds[name]:.0f} s)")
            return result

        base = step("pull", f"pull the base {o.base}", self.pull_base)
        step("prepare", f"prepare {o.source} with the base's tokenizer -> {o.data}", self.prepare, base)
        evaluations: dict[str, dict] = {}
        if o.evaluate:
            evaluations["base"] = step("evaluate base", f"evaluate the base {base}", self.evaluate_base, base)
        config = self.finetune_config(base)
        with training(config) as on_event:
            what = f"LoRA fine-tune for {o.steps} steps (at most {config.minutes:.3g} minutes) -> {o.out}"
            step("fine-tune", what, self.finetune, base, config, on_event)
        samples = step("generate", "generate reviews and continuations", self.generate_samples)
        if o.evaluate:
            what = f"evaluate the fine-tuned run {o.out} (the base judges its samples)"
            evaluations["fine-tuned"] = step("evaluate fine-tuned", what, self.evaluate_finetuned, base)
        if o.compare_scratch:
            config = self.scratch_config()
            with training(config) as on_event:
                what = f"from scratch: a {o.scratch_preset} GPT for {o.scratch_minutes:g} minutes"
                scratch = step("from scratch", what, self.scratch_run, base, config, on_event)
            if scratch is not None:
                evaluations["scratch"] = scratch
        return step("report", "write the report", self.write_report, samples, evaluations, self.clock.seconds)

    def pull_base(self) -> Path:
        """The base's run folder: a built-in name is converted from its installed package once."""
        base = self.options.base
        if base in BUILT_IN_MODELS and not Path(base).exists():
            # Deferred: pulling imports the GGUF reader, which only this step needs.
            from aigc.interop.pretrained import pull

            folder = pull(base)
            self.say(f"{base}: {folder}")
            return folder
        folder = Path(base)
        if not (folder / CONFIG).is_file():
            raise AigcError(
                f"--base {base} is neither a built-in model ({', '.join(BUILT_IN_MODELS)}) nor a run folder; "
                "pass one of those"
            )
        return folder

    def prepare(self, base: Path) -> None:
        """`aigc prepare SOURCE --tokenizer BASE`: the base's tokenizer plus a control token per label."""
        # Deferred: a slow import that only this path needs.
        from aigc.data.prepare import prepare_dataset
        from aigc.tokenizer import Tokenizer

        o = self.options
        if (o.data / "dataset.json").is_file() and not o.fresh:
            fingerprint = Tokenizer.load(base / "tokenizer.json").vocab_fingerprint()
            if read_dataset_info(o.data).get("base_tokenizer_fingerprint") != fingerprint:
                raise AigcError(
                    f"{o.data} was prepared with another tokenizer than the base {base}'s; pass --fresh to "
                    "prepare it again, or another --data"
                )
            self.say(f"reusing {o.data} (pass --fresh to prepare it again)")
            return
        builtin = o.source in ("imdb", "rotten-tomatoes")
        config = PrepareConfig(
            seed=o.seed, overwrite=o.fresh, label_column=None if builtin else "label", tokenizer=str(base)
        )
        info = prepare_dataset(o.source, o.data, config, progress=self.say)
        splits = ", ".join(f"{name} {s['tokens']:,} tokens" for name, s in info["splits"].items())
        self.say(f"{splits}; {info['bytes_per_token']:.2f} bytes/token")

    def eval_config(self, samples: int) -> EvalConfig:
        """Small enough for a CPU: a 135M model decodes ~100 tokens/s at batch 16 on a shared 2-core CPU."""
        return EvalConfig(
            lm_docs=12,
            prompts=8,
            samples=samples,
            max_new_tokens=96,
            classifier_docs=6000,
            batch_size=16,
            seed=self.options.seed,
        )

    def evaluate_base(self, base: Path) -> dict:
        """The base on the same held-out documents (its tokenizer lacks the control tokens: they are
        left out) and as many free samples as the fine-tuned run draws in all."""
        o = self.options
        saved = o.out / EVAL / BASE_EVAL
        if saved.is_file() and not o.fresh and same_sampling(saved, o.guidance_scale):
            self.say(f"reusing {saved}")
            return read_json(saved)
        prompts = label_prompts(o.data)
        samples = o.eval_samples if prompts else o.eval_samples * max(1, len(_dataset_labels(o.data)))
        return self._evaluate(base, self.eval_config(samples), data=o.data, judge=None, prompts=prompts)

    def finetune_config(self, base: Path) -> TrainConfig:
        """LoRA (the defaults for an imported base, `--dtype auto`) at batch `FINETUNE_BATCH` for `steps`,
        or `minutes` if that comes first. A step budget, not a time budget alone: the same steps give the
        same run on a busy or an idle machine; the minutes cap keeps the demo's time bounded on a CPU
        that trains slower (docs/demo.md has the figures)."""
        o = self.options
        seq_len = min(FINETUNE_DEFAULTS["seq_len"], read_run_config(base).model.block_size)
        return finetune_train_config(
            max_steps=o.steps,
            minutes=self.finetune_minutes(),
            seed=o.seed,
            seq_len=seq_len,
            batch_size=FINETUNE_BATCH,
            eval_every=max(1, o.steps // 2),
            sample_tokens=24,
        )

    def finetune_minutes(self) -> float:
        """`minutes`, or less where the whole demo would pass `budget_minutes` on this machine: the
        steps so far as they took, the steps after the fine-tune as the base's evaluation suggests (the
        fine-tuned run's took 1.4x as long, 138 s against 99 on a 2-core AVX2 EPYC: it also draws
        unguided samples), plus generation and the fine-tune's own start and end. Never below
        MIN_FINETUNE_MINUTES: the labels need some steps to be learnt at all."""
        o = self.options
        evaluation = FINETUNED_EVAL_RATIO * self.clock.seconds.get("evaluate base", 0.0) if o.evaluate else 0.0
        left = o.budget_minutes * 60 - self.clock.total() - evaluation - AROUND_FINETUNE_S
        return max(MIN_FINETUNE_MINUTES, min(o.minutes, left / 60))

    def finetune(self, base: Path, config: TrainConfig, on_event: EventCallback | None = None) -> None:
        """Fine-tune the base into `out` with `config`; an unfinished run continues."""
        o = self.options
        resume = (o.out / CONFIG).is_file() and not o.fresh
        if resume:
            self.say(f"{o.out} exists: continuing it if unfinished (pass --fresh to train again)")
        init_from = None if resume else base
        _train(o.data, o.out, config, init_from=init_from, resume=resume, fresh=o.fresh, on_event=on_event)

    def generate_samples(self) -> list[dict]:
        """Three reviews per label and a continuation of each fixed prompt, decoded as one batch; also
        written to RUN/samples.json."""
        # Deferred: slow imports that only this path needs.
        from aigc.artifacts.device import pick_device
        from aigc.evaluate.run import for_inference, generate_all
        from aigc.models import load_run

        o = self.options
        run = for_inference(load_run(o.out, device=pick_device("auto")))
        requests = demo_requests(run.labels, o.seed, o.guidance_scale)
        completions = generate_all(run, requests, batch_size=len(requests))
        samples = [
            dict(label=r.label or "", prompt=r.prompt, text=c.text.strip()) for r, c in zip(requests, completions)
        ]
        write_json(o.out / "samples.json", samples)
        for s in samples:
            shown = f"{s['prompt']} {s['text']}" if s["prompt"] else s["text"]
            self.say(f"[{s['label'] or 'continuation'}] {' '.join(shown.split())[:300]}")
        return samples

    def evaluate_finetuned(self, base: Path) -> dict:
        """The fine-tuned run with the demo's evaluation sizes; the base judges the fluency of its samples."""
        o = self.options
        saved = o.out / EVAL / "metrics.json"
        trained = max((p.stat().st_mtime for p in o.out.glob("*.safetensors")), default=0.0)
        newer = saved.is_file() and saved.stat().st_mtime > trained
        unguided = newer and "unguided" in read_json(saved).get("control", {})
        if unguided and not o.fresh and same_sampling(saved, o.guidance_scale):
            self.say(f"reusing {saved} (newer than the weights)")
            return read_json(saved)
        config = self.eval_config(o.eval_samples)
        return self._evaluate(o.out, config, data=None, judge=base, prompts=label_prompts(o.data), unguided=True)

    def scratch_config(self) -> TrainConfig:
        o = self.options
        return train_preset(o.scratch_preset, minutes=o.scratch_minutes, seed=o.seed, eval_every=100)

    def scratch_run(self, base: Path, config: TrainConfig, on_event: EventCallback | None = None) -> dict | None:
        """From scratch: prepare with a tokenizer of its own, train a small GPT, evaluate it."""
        # Deferred: a slow import that only this path needs.
        from aigc.data.prepare import prepare_dataset

        o = self.options
        data, out = o.scratch_data, o.scratch_out
        if (data / "dataset.json").is_file() and not o.fresh:
            self.say(f"reusing {data}")
        else:
            builtin = o.source in ("imdb", "rotten-tomatoes")
            prepare = PrepareConfig(seed=o.seed, overwrite=o.fresh, label_column=None if builtin else "label")
            prepare_dataset(o.source, data, prepare, progress=self.say)
        resume = (out / CONFIG).is_file() and not o.fresh
        preset = o.scratch_preset
        _train(data, out, config, init_from=None, resume=resume, fresh=o.fresh, preset=preset, on_event=on_event)
        if not o.evaluate:
            return None
        sizes = self.eval_config(o.eval_samples)
        result = self._evaluate(out, sizes, data=None, judge=base, prompts=label_prompts(data))
        write_json(out / EVAL / "metrics.json", result)
        return result

    def write_report(self, samples: list[dict], evaluations: dict[str, dict], seconds: dict[str, float]):
        """RUN/report.md and .html: samples, the side-by-side comparison, the targets and the timings."""
        # Deferred: slow imports that only this path needs.
        from aigc.demo.report import report_sections
        from aigc.report import write_report

        out = self.options.out
        for name, file in (("base", BASE_EVAL), ("fine-tuned", "metrics.json"), ("scratch", SCRATCH_EVAL)):
            if name in evaluations:
                write_json(out / EVAL / file, evaluations[name])
        sections = report_sections(out, samples, evaluations, seconds)
        return write_report(out, sections, evaluation=evaluations.get("fine-tuned"))

    def _evaluate(
        self, run_dir: Path, config: EvalConfig, *, data: Path | None, judge: Path | None, prompts, unguided=False
    ) -> dict:
        # Deferred: a slow import that only this path needs.
        from aigc.evaluate.run import evaluate_run

        return evaluate_run(
            run_dir,
            config=config,
            sampling=eval_sampling(self.options.guidance_scale),
            data=data,
            judge=judge,
            progress=self.say,
            sample_prompts=prompts,
            unguided_control=unguided,
        )


def _train(data: Path, out: Path, config, *, init_from, resume: bool, fresh: bool, preset="small", on_event=None):
    # Deferred: a slow import that only this path needs.
    from aigc.train.loop import train

    train(
        None if resume else data,
        out,
        None,
        None if resume else config,
        preset=preset,
        resume=resume,
        init_from=init_from,
        overwrite=fresh,
        on_event=on_event,
    )


def demo_requests(labels, seed: int, guidance_scale: float) -> list:
    """`REVIEWS_PER_LABEL` reviews per label, each guided away from the other label, then one
    continuation per fixed prompt; a distinct seed per request (shared seeds make the labels' samples
    start alike)."""
    # Deferred: a slow import that only this path needs.
    from aigc.generate import Request

    requests = []
    for label in labels:
        others = [other for other in labels if other != label]
        negative = others[0] if len(others) == 1 else None  # guided away from the other label (aigc.guidance)
        for _ in range(REVIEWS_PER_LABEL):
            config = dataclasses.replace(REVIEW_SAMPLING, seed=seed + len(requests), guidance_scale=guidance_scale)
            request = Request(LABEL_PROMPTS.get(label, ""), label, config, negative_label=negative)
            requests.append(dataclasses.replace(request, negative_prompt=LABEL_PROMPTS.get(negative, "")))
    for prompt in CONTINUATION_PROMPTS:
        config = dataclasses.replace(CONTINUATION_SAMPLING, seed=seed + len(requests))
        requests.append(Request(prompt=prompt, config=config))
    return requests


def eval_sampling(guidance_scale: float) -> SampleConfig:
    return dataclasses.replace(EVAL_SAMPLING, guidance_scale=guidance_scale)


def same_sampling(saved: Path, guidance_scale: float) -> bool:
    """Whether a saved evaluation was sampled as this demo samples (else it is redone): the same
    guidance scale and the same settings, bar the length and seed that each evaluation sets."""
    stored = read_json(saved).get("sampling", {})
    wanted = to_dict(eval_sampling(guidance_scale))
    return all(stored.get(key) == value for key, value in wanted.items() if key not in ("max_new_tokens", "seed"))


def label_prompts(data: Path) -> dict[str, str]:
    """The sentiment sentence of each of the dataset's labels that has one."""
    return {label: LABEL_PROMPTS[label] for label in _dataset_labels(data) if label in LABEL_PROMPTS}


def _dataset_labels(data: Path) -> list[str]:
    return list(read_dataset_info(data).get("labels") or [])


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
