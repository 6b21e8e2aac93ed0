"""The model card (README.md) written beside an exported model: data, size, training and metrics."""

from __future__ import annotations

import dataclasses
import json

from aigc import __version__
from aigc.artifacts.run import Run
from aigc.tokenizer import label_token


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: dict) -> list[str]:
    lines = ["| | |", "| --- | --- |"]
    lines += [f"| {key} | {_fmt(value)} |" for key, value in rows.items() if value not in (None, "", [], {})]
    return lines


def _size_rows(run: Run) -> dict:
    c = run.config.model
    return {
        "architecture": "GPT-2 (GPT2LMHeadModel)",
        "parameters": run.model.num_params(),
        "layers": c.n_layer,
        "heads": c.n_head,
        "embedding width": c.n_embd,
        "context length": c.block_size,
        "vocabulary": c.vocab_size,
    }


# Friendlier names for the metrics.jsonl fields a reader of the card looks for first.
METRIC_NAMES = {"tokens": "training tokens", "elapsed_s": "training time (s)", "step": "optimizer steps"}


def _training_rows(run: Run, metrics: list[dict]) -> dict:
    last = metrics[-1] if metrics else {}
    numbers = {k: v for k, v in last.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    rows = {METRIC_NAMES.get(key, key): value for key, value in numbers.items()}
    losses = [m["val_loss"] for m in metrics if isinstance(m.get("val_loss"), (int, float))]
    if losses:
        rows["best val_loss"] = min(losses)
    return rows


def _usage(run: Run) -> list[str]:
    example = label_token(run.labels[0]) if run.labels else ""
    lines = [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        "# Like aigc, start with <|endoftext|>: every training document follows one.",
        f'ids = tokenizer(tokenizer.eos_token + "{example}The", return_tensors="pt").input_ids',
        "out = model.generate(ids, max_new_tokens=40, do_sample=True, temperature=0.8)",
        "print(tokenizer.decode(out[0], skip_special_tokens=True))",
        "```",
    ]
    if run.labels:
        tokens = ", ".join(f"`{label_token(label)}`" for label in run.labels)
        lines += ["", f"Start a prompt with a label's control token ({tokens}) to condition the text on it."]
    return lines


def model_card(run: Run) -> str:
    """Markdown with a metadata header, so a model hub shows it as the model's page."""
    config = run.config
    data = {key: value for key, value in config.data.items() if not isinstance(value, (dict, list))}
    if run.labels:
        data["labels"] = ", ".join(run.labels)
    metrics = run.metrics()
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [gpt2, aigc]",
        "---",
        "",
        f"# {run.path.name}",
        "",
        f"A GPT-2-architecture language model trained with aigc {__version__} and exported to the Hugging Face format.",
        "",
        "## Data",
        *(_table(data) if data else ["Not recorded in the run."]),
        "",
        "## Size",
        *_table(_size_rows(run)),
        "",
        "## Training and metrics",
        *(_table(_training_rows(run, metrics)) if metrics else ["The run has no metrics.jsonl (not trained by aigc)."]),
    ]
    if config.init_from or config.extra or not config.weights.is_plain:
        provenance = {"init_from": config.init_from, **config.extra}
        if not config.weights.is_plain:
            provenance["weights"] = dataclasses.asdict(config.weights)
        lines += ["", "## Provenance", "```json", json.dumps(provenance, indent=2, ensure_ascii=False), "```"]
    lines += ["", "## Use", *_usage(run), ""]
    lines += [
        "## Limitations",
        "A small model trained on the data above: it imitates the style of that text, is not a source of facts, "
        "and repeats the biases of its data.",
        "",
    ]
    return "\n".join(lines)
