"""`evaluate_run`: every metric of one run, each recorded with what it was computed on.

Order of work: language modelling on held-out documents → generation (continuations of held-out
prompts, then free samples per label) → reference metrics, diversity, fluency, control accuracy,
memorisation and privacy on what was generated. The result is one JSON-ready dict.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from aigc.artifacts import heap
from aigc.artifacts.dataset import DATASET_JSON, TOKENIZER, check_same_tokenizer, open_split, read_dataset_info
from aigc.artifacts.device import pick_device
from aigc.config import EvalConfig, SampleConfig, to_dict
from aigc.errors import AigcError
from aigc.evaluate import control, human, lm, memorise, privacy, reference, textstats
from aigc.generate import Request, encode_request, generate
from aigc.models import Run, load_run
from aigc.models.lora import has_lora, merge_lora
from aigc.tokenizer import Tokenizer

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Generated:
    """One generated text and how it came about."""

    kind: str  # "continuation" (of a held-out prompt) or "sample" (free, per label)
    label: str | None
    prompt: str
    text: str
    tokens: int
    ended_at_eot: bool
    reference: str | None = None


def dataset_folder(run: Run, data: str | os.PathLike | None) -> tuple[Path, dict]:
    """The prepared dataset of a run: `data` if given, else the path recorded in its config.json."""
    recorded = run.config.data.get("path")
    if data is None and not recorded:
        raise AigcError(
            f"run {run.path} does not record the dataset it was trained on; pass --data DIR (a folder made "
            "by aigc prepare)"
        )
    folder = Path(data if data is not None else recorded)
    if not (folder / DATASET_JSON).is_file():
        where = "given with --data" if data is not None else "recorded in the run's config.json"
        raise AigcError(f"no prepared dataset at {folder} ({where}; moved or deleted?); pass --data DIR")
    info = read_dataset_info(folder)
    tokenizer_file = folder / TOKENIZER
    if tokenizer_file.is_file() and not is_base_tokenizer(info, run.tokenizer):
        fix = "pass --data with the dataset this run was trained on"
        check_same_tokenizer(folder, Tokenizer.load(tokenizer_file), run.tokenizer, run.path, fix=fix)
    return folder, info


def is_base_tokenizer(info: dict, tokenizer: Tokenizer) -> bool:
    """True when `tokenizer` is the one the dataset's was grown from (control tokens appended after
    its last id, as `aigc prepare --tokenizer BASE` does): every id it has means the same in the
    dataset, so the dataset can be read with the control tokens left out."""
    return info.get("base_tokenizer_fingerprint") == tokenizer.vocab_fingerprint()


def reading_tokenizer(run: Run, folder: Path, info: dict) -> Tokenizer:
    """The tokenizer that decodes the dataset's ids: the run's, or the dataset's own when the run is
    its base (the run's lacks the appended control-token ids)."""
    if is_base_tokenizer(info, run.tokenizer) and (folder / TOKENIZER).is_file():
        return Tokenizer.load(folder / TOKENIZER)
    return run.tokenizer


def for_inference(run: Run) -> Run:
    """Fold a LoRA run's adapters into its weights, in memory: the same logits, but each layer is one
    matmul again (the unfolded LoRA model scored IMDb documents 1.9x slower on a 2-core CPU)."""
    if has_lora(run.model):
        merge_lora(run.model).eval()
    return run


def generate_all(run: Run, requests: Sequence, batch_size: int) -> list:
    """Completions for `requests`, decoded `batch_size` at a time (bounds the KV cache)."""
    completions = []
    with _one_cpu_thread(run):
        for first in range(0, len(requests), batch_size):
            completions += generate(run.model, run.tokenizer, requests[first : first + batch_size])
    return completions


@contextmanager
def _one_cpu_thread(run: Run) -> Iterator[None]:
    """Decode on CPU with one intra-op thread. Each decode step is many tiny ops on (B, 1, C)
    activations, so thread hand-offs can cost more than the work (docs/evaluate.md has the figures:
    two threads decoded the `small` GPT 3-12x slower than one on a shared 2-core CPU), whereas the big
    batches of `lm.score_sequences` gain from threads, so only this stage is pinned."""
    if next(run.model.parameters()).device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def draw(
    run: Run,
    pairs: Sequence[reference.Pair],
    config: EvalConfig,
    sampling: SampleConfig,
    sample_prompts: dict[str, str] | None = None,
) -> list[Generated]:
    """Continue every pair's prompt, then draw `config.samples` samples per label (or in total).

    `sample_prompts` (label -> text) starts each label's samples with that text after the control
    token; a run without labels then draws `config.samples` from each text alone (a plain prefix), and
    its samples are filed under that label. With `sampling.guidance_scale` > 1 (aigc.guidance) each
    of two groups' samples is guided away from the other group (its label and text); with more groups,
    away from an empty context. Continuations of held-out prompts are never guided."""
    known = set(run.tokenizer.labels)
    prompts = dict(sample_prompts or {})
    if known:  # (label of the request, label the sample is filed under, prompt)
        groups = [(label, label, prompts.get(label, "")) for label in run.tokenizer.labels]
    else:
        groups = [(None, name, prompt) for name, prompt in prompts.items()] or [(None, None, "")]
    unguided = _replace(sampling, guidance_scale=1.0)
    contexts = [(label, prompt) for label, _, prompt in groups]
    # (kind, request label, filed label, prompt, reference, (negative label, negative prompt) or None)
    jobs = [
        ("continuation", known_label, known_label, p.prompt, p.reference, None)
        for p in pairs
        for known_label in [p.label if p.label in known else None]
    ]
    guided = sampling.guidance_scale != 1.0
    for label, filed, prompt in groups:
        negative = _negative_of((label, prompt), contexts) if guided else None
        jobs += [("sample", label, filed, prompt, None, negative)] * config.samples
    requests = [
        Request(
            prompt,
            label,
            _replace(sampling if negative else unguided, seed=config.seed + i),
            negative_label=negative[0] if negative else None,
            negative_prompt=negative[1] if negative else "",
        )
        for i, (_, label, _, prompt, _, negative) in enumerate(jobs)
    ]
    completions = generate_all(run, requests, config.batch_size)
    eot = run.tokenizer.eot_id
    return [
        Generated(kind, filed, prompt, c.text, len(c.token_ids), bool(c.token_ids) and c.token_ids[-1] == eot, ref)
        for (kind, _, filed, prompt, ref, _), c in zip(jobs, completions)
    ]


def _negative_of(group: tuple, groups: list[tuple]) -> tuple[str | None, str]:
    """(label, prompt) to guide a group's samples away from: the other group of two, else nothing."""
    if len(groups) != 2:
        return None, ""
    return groups[1 - groups.index(group)]


def _replace(sampling: SampleConfig, **changes) -> SampleConfig:
    return replace(sampling, **changes)


def fluency(judge: Run, items: Sequence[Generated], batch_size: int) -> tuple[dict, list[float | None]]:
    """Perplexity of generated text under `judge`, given the same prefix and prompt it was made from.

    The text is re-tokenized with the judge's tokenizer, so bits per byte is the figure to compare
    across runs with different tokenizers.
    """
    tok = judge.tokenizer
    sequences, firsts = [], []
    for item in items:
        label = item.label if item.label in tok.labels else None
        context = encode_request(tok, Request(prompt=item.prompt, label=label))
        body = tok.encode(item.text) + ([tok.eot_id] if item.ended_at_eot else [])
        sequences.append(context + body)
        firsts.append(len(context))
    scores = lm.score_sequences(
        judge.model, sequences, firsts, block_size=judge.config.model.block_size, batch_size=batch_size
    )
    per_item = [float(np.exp(s[1].mean())) if len(s[1]) else None for s in scores]
    summary = lm.summarize(scores, lm.byte_lengths(tok))
    return {**summary, "scored_by": str(judge.path), "num_samples": len(items)}, per_item


def language_modelling(run: Run, folder: Path, config: EvalConfig, text: str | os.PathLike | None) -> dict:
    """Loss, perplexity, bits per byte and accuracy on whole held-out documents (and a text file)."""
    split = open_split(folder, config.split)
    sequences = lm.document_sequences(split, run.tokenizer.eot_id, config.lm_docs)
    # A base model scored on data prepared for its fine-tuning: drop the control tokens it has no id
    # for. They stand for no bytes, so bits per byte still compare over the same text.
    known = run.tokenizer.vocab_size
    stripped = sum(t >= known for seq in sequences for t in seq)
    sequences = [[t for t in seq if t < known] for seq in sequences]
    block = run.config.model.block_size
    token_bytes = lm.byte_lengths(run.tokenizer)
    scores = lm.score_sequences(
        run.model, sequences, [1] * len(sequences), block_size=block, batch_size=config.batch_size
    )
    summary = lm.summarize(scores, token_bytes)
    summary["computed_on"] = {
        "split": config.split,
        "documents": len(sequences),
        "documents_in_split": int(len(split.docs)),
        "tokens": summary["tokens"],
        "window_and_stride": f"{block} / {max(1, block // 2)} tokens",
    }
    if stripped:
        summary["computed_on"]["control_tokens_stripped"] = stripped
    result = {"split": summary}
    if text is not None:
        path = Path(text)
        if not path.is_file():
            raise AigcError(f"--text file not found: {path}; give a UTF-8 text file to score")
        ids = [run.tokenizer.eot_id] + run.tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        file_scores = lm.score_sequences(run.model, [ids], [1], block_size=block, batch_size=config.batch_size)
        file_summary = lm.summarize(file_scores, token_bytes)
        result["text_file"] = {**file_summary, "computed_on": {"file": str(path), "tokens": file_summary["tokens"]}}
    return result


def control_section(
    run: Run, folder: Path, info: dict, config: EvalConfig, items: Sequence[Generated], unguided=()
) -> dict:
    """Classifier trained on the train split, its held-out accuracy, then control accuracy of samples
    (and, under "unguided", of the `unguided` samples: drawn from the control token alone)."""
    # A run without control tokens (a base) has samples filed under a label only when they were drawn
    # from that label's text prompt (`sample_prompts`): then the dataset's labels are the classes.
    labels = list(run.tokenizer.labels) or list(info.get("labels") or [])
    samples = [item for item in items if item.kind == "sample" and item.label in labels]
    if not labels or not samples:
        return {
            "skipped": "the run was trained without labels, so no sample was generated for a requested label; "
            "prepare the data with --label-column to train a labelled run"
        }
    # Document label indices follow dataset.json's label list; map them onto the run's order by name.
    names = list(info.get("labels") or labels)
    remap = np.array([labels.index(n) if n in labels else -1 for n in names] + [-1], dtype=np.int64)
    tokenizer = reading_tokenizer(run, folder, info)
    train_texts, train_ids = control.labelled_texts(
        open_split(folder, "train"), tokenizer, max_docs=config.classifier_docs, seed=config.seed
    )
    held_texts, held_ids = control.labelled_texts(open_split(folder, config.split), tokenizer)
    train_ids, held_ids = remap[train_ids], remap[held_ids]
    classifier = control.train_classifier(
        [t for t, i in zip(train_texts, train_ids) if i >= 0], train_ids[train_ids >= 0], labels, seed=config.seed
    )
    scores = control.control_accuracy(classifier, [s.text for s in samples], [s.label for s in samples])
    if unguided:
        plain = control.control_accuracy(classifier, [s.text for s in unguided], [s.label for s in unguided])
        scores["unguided"] = {
            "accuracy": plain["accuracy"],
            "per_label": plain["per_label"],
            "computed_on": f"{len(unguided)} samples from the control token alone: no sentence, no guidance",
        }
    return {
        **scores,
        "classifier": {
            "model": "TF-IDF (unigrams, sublinear tf, 20k features) + logistic regression (scikit-learn)",
            "train_documents": int((train_ids >= 0).sum()),
            "held_out_split": config.split,
            "held_out_documents": int((held_ids >= 0).sum()),
            "held_out_accuracy": control.classifier_accuracy(
                classifier, [t for t, i in zip(held_texts, held_ids) if i >= 0], held_ids[held_ids >= 0]
            ),
        },
        "computed_on": {
            "samples": len(samples),
            "samples_per_label": config.samples,
            "classifier_trained_on": f"{int((train_ids >= 0).sum())} train documents",
            "classifier_tested_on": f"{int((held_ids >= 0).sum())} {config.split} documents",
        },
    }


def memorisation_section(run: Run, folder: Path, config: EvalConfig, items: Sequence[Generated]) -> dict:
    """Longest verbatim span of every generated text in the train split, via the n-gram index."""
    start = time.perf_counter()
    index = memorise.NgramIndex(np.asarray(open_split(folder, "train").tokens))
    built = time.perf_counter() - start
    encoded = run.tokenizer.encode_batch([item.text for item in items])
    metrics = memorise.memorisation_metrics(index, encoded, config.min_span)
    return {
        **metrics,
        "index_build_s": built,
        "query_s": time.perf_counter() - start - built,
        "computed_on": {
            "index": f"every {index.n}-gram of the train split ({len(index):,} tokens)",
            "texts": f"{len(items)} ({sum(i.kind == 'sample' for i in items)} samples, "
            f"{sum(i.kind == 'continuation' for i in items)} continuations)",
        },
    }


class _Stages:
    """Times each stage and reports it through the progress callback."""

    def __init__(self, progress: Progress | None):
        self.progress, self.timings = progress, {}

    def run(self, name: str, function: Callable, *args, **kwargs):
        if self.progress:
            self.progress(f"{name} …")
        start = time.perf_counter()
        result = function(*args, **kwargs)
        self.timings[name] = round(time.perf_counter() - start, 3)
        if self.progress:
            self.progress(f"{name}: {self.timings[name]:.1f} s")
        return result


def evaluate_run(
    run_dir: str | os.PathLike,
    *,
    config: EvalConfig = EvalConfig(),
    sampling: SampleConfig = SampleConfig(),
    data: str | os.PathLike | None = None,
    references: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    judge: str | os.PathLike | None = None,
    progress: Progress | None = None,
    sample_prompts: dict[str, str] | None = None,
    unguided_control: bool = False,
) -> dict:
    """Evaluate one run; returns the dict that `aigc eval` writes to RUN/eval/metrics.json. With
    `unguided_control` a labelled run also draws `config.samples` per label from its control token
    alone (no sentence, no guidance): whether the label was learnt, not forced by guidance."""

    started = time.perf_counter()
    device = pick_device(config.device)
    run = for_inference(load_run(run_dir, device=device))
    folder, info = dataset_folder(run, data)
    pairs = reference.read_references(references) if references is not None else None
    judge_run = load_run(judge, device=device) if judge is not None else None
    sampling = _replace(sampling, max_new_tokens=config.max_new_tokens)
    stages = _Stages(progress)
    with heap.kept(device.type == "cpu"):  # each scoring batch's logits reuse the last one's memory
        lm_result = stages.run("language modelling", language_modelling, run, folder, config, text)
    if pairs is None:
        pairs = reference.held_out_pairs(
            open_split(folder, config.split),
            reading_tokenizer(run, folder, info),
            info.get("labels") or run.tokenizer.labels,
            count=config.prompts,
            prompt_tokens=config.prompt_tokens,
            reference_tokens=config.max_new_tokens,
            seed=config.seed,
        )
    items = stages.run("generation", draw, run, pairs, config, sampling, sample_prompts)
    result = {
        "run": str(run.path),
        "model": run.config.model.kind,
        "data": str(folder),
        "device": str(device),
        "config": to_dict(config),
        "sampling": {**to_dict(sampling), "seed": f"{config.seed} + sample index"},
        "sample_prompts": dict(sample_prompts or {}),
        "language_modelling": lm_result,
    }
    result.update(stages.run("text metrics", _text_metrics, items, pairs, references, config))
    lengths = [item.tokens for item in items if item.kind == "sample"]
    split, reader = open_split(folder, config.split), reading_tokenizer(run, folder, info)
    result["diversity"]["human"] = human.human_diversity(split, reader, lengths, seed=config.seed + 1)
    plain = []
    if unguided_control and run.tokenizer.labels:
        plain = stages.run("unguided generation", draw, run, [], config, _replace(sampling, guidance_scale=1.0))
        result["diversity"]["unguided"] = _unguided_diversity(plain, split, reader, config.seed)
    with heap.kept(device.type == "cpu"):
        self_fluency, self_ppl = stages.run("fluency", fluency, run, items, config.batch_size)
    result["fluency"] = {"self": self_fluency, "note": FLUENCY_NOTE}
    if judge_run is not None:
        result["fluency"]["judge"], _ = stages.run("judge fluency", fluency, judge_run, items, config.batch_size)
    result["control"] = stages.run("control accuracy", control_section, run, folder, info, config, items, plain)
    result["memorisation"] = stages.run("memorisation", memorisation_section, run, folder, config, items)
    result["privacy"] = privacy.redaction_check([item.text for item in items])
    result["samples"] = _sample_rows(items, self_ppl, result)
    result["timings_s"] = stages.timings
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    return result


FLUENCY_NOTE = (
    "Perplexity of the generated text under a model: a crude fluency proxy. Under the run itself it "
    "rewards text the model finds likely (low-temperature loops score well); a second run (--judge) is "
    "a less self-serving reader, but still no substitute for human judgement."
)


def _text_metrics(items: Sequence[Generated], pairs, references, config: EvalConfig) -> dict:
    continuations = [item for item in items if item.kind == "continuation"]
    samples = [item for item in items if item.kind == "sample"]
    source = str(references) if references is not None else f"held-out {config.split} documents"
    ref = reference.reference_metrics([c.text for c in continuations], [c.reference or "" for c in continuations])
    ref["computed_on"] = {
        "pairs_from": source,
        "pairs": len(continuations),
        "prompt_tokens": config.prompt_tokens if references is None else "as given",
        "reference_tokens": config.max_new_tokens if references is None else "as given",
    }
    diversity = textstats.diversity_metrics(
        [s.text for s in samples], [s.tokens for s in samples], [s.ended_at_eot for s in samples]
    )
    prompts = sorted({s.prompt for s in samples})
    shown = "empty (free samples)" if prompts == [""] else " / ".join(f"“{p}”" for p in prompts)
    diversity["computed_on"] = {"samples": len(samples), "prompt": shown, "unit": "words"}
    return {"reference": ref, "diversity": diversity}


def _unguided_diversity(samples: Sequence[Generated], split, reader, seed: int) -> dict:
    """Diversity of the samples drawn from the control token alone, and of held-out human reviews cut
    to their lengths: guidance narrows the text, so the learnt model's own variety is read here."""
    texts, lengths = [s.text for s in samples], [s.tokens for s in samples]
    return {
        **textstats.diversity_metrics(texts, lengths, [s.ended_at_eot for s in samples]),
        "human": human.human_diversity(split, reader, lengths, seed=seed + 1),
        "computed_on": {"samples": len(samples), "prompt": "the control token alone, no guidance", "unit": "words"},
    }


def _sample_rows(items: Sequence[Generated], perplexities: Sequence[float | None], result: dict) -> list[dict]:
    """Every generated text with its own scores, for the report and for inspection."""
    spans = result["memorisation"]["longest_span_per_sample"]
    probabilities = iter(result["control"].get("sample_probabilities", []))
    rows = []
    for item, ppl, span in zip(items, perplexities, spans):
        row = {**asdict(item), "perplexity": ppl, "longest_span": span}
        if item.kind == "sample" and item.label in result["control"].get("per_label", {}):
            row["label_probability"] = next(probabilities)
        rows.append(row)
    return rows
