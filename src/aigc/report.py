"""The run report: `RUN/report.md` and a self-contained `RUN/report.html` (images embedded).

Built only from what the run folder holds: config.json, metrics.jsonl, plots/*.png, eval/metrics.json
(and eval/compare.png). Callers such as `aigc demo` add their own sections with `extra_sections`.
The HTML is the Markdown rendered by `markdown-it-py`, so the two always say the same thing.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

from aigc import __version__
from aigc.artifacts.hardware import describe_hardware
from aigc.artifacts.run import EVAL, PLOTS, WEIGHTS, RunConfig, read_metrics, read_run_config, stored_parameter_count
from aigc.errors import AigcError
from aigc.evaluate.describe import eval_markdown, fmt, table
from aigc.fsutil import write_text
from aigc.models.kinds import describe_run

Section = tuple[str, str]  # (title, Markdown body)

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; } h2 { border-bottom: 1px solid #eee; margin-top: 2rem; }
table { border-collapse: collapse; margin: 0.5rem 0 1rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.6rem; vertical-align: top; }
th { background: #f4f4f4; } td:nth-child(2) { font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5rem 0; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.6rem; border-radius: 4px; }
pre code { font-family: Georgia, serif; font-size: 0.95rem; }  /* samples are prose, not code */
blockquote { color: #555; border-left: 3px solid #ccc; margin-left: 0; padding-left: 1rem; }
"""


def write_report(
    run_dir: str | os.PathLike, extra_sections: Sequence[Section] = (), *, evaluation: dict | None = None
) -> tuple[Path, Path]:
    """Write RUN/report.md and RUN/report.html (atomically) and return their paths.

    `extra_sections` are (title, Markdown body) pairs placed after the training curves; `evaluation`
    overrides RUN/eval/metrics.json (for `aigc eval --out` elsewhere).
    """
    run_dir = Path(run_dir)
    markdown = build_markdown(run_dir, extra_sections, evaluation=evaluation)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    write_text(md_path, markdown)
    write_text(html_path, render_html(markdown, run_dir, title=f"aigc report: {run_dir.name}"))
    return md_path, html_path


def build_markdown(run_dir: Path, extra_sections: Sequence[Section] = (), *, evaluation: dict | None = None) -> str:
    config = _run_config_json(run_dir)
    metrics = read_metrics(run_dir)
    if evaluation is None:
        evaluation = _read_json(run_dir / EVAL / "metrics.json")
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [f"# Run report: {run_dir.name}", f"_Written {stamp} by aigc {__version__} from `{run_dir}`._"]
    parts.append(summary_section(run_dir, config, metrics))
    parts.append(curves_section(run_dir))
    parts += [f"## {title}\n\n{body.strip()}" for title, body in extra_sections]
    if evaluation:
        parts.append(eval_markdown(evaluation, chart=_relative_if_exists(run_dir, "eval/compare.png")))
    elif (run_dir / EVAL / "metrics.json").is_file():
        parts.append(f"## Evaluation\n\n`eval/metrics.json` is damaged; run `aigc eval {run_dir}` again.")
    else:
        parts.append(f"## Evaluation\n\nNot evaluated yet: run `aigc eval {run_dir}` to add it here.")
    return "\n\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------------------------------------
# Summary and curves
# ---------------------------------------------------------------------------------------------


def summary_section(run_dir: Path, config: dict, metrics: list[dict]) -> str:
    """Data, model size, tokens seen, time and hardware, from the run folder alone."""
    data = config.get("data", {})
    train = config.get("train", {})
    last = metrics[-1] if metrics else {}
    best = min((m for m in metrics if m.get("val_loss") is not None), key=lambda m: m["val_loss"], default={})
    rows = [
        ("data", f"`{data.get('path', 'not recorded')}`" + _data_counts(data)),
        ("labels", ", ".join(data.get("labels") or []) or "none"),
        ("model", _model_line(run_dir, config)),
        ("initialised from", config.get("init_from") or "scratch"),
        ("steps", fmt(last.get("step"))),
        ("tokens seen", fmt(last.get("tokens"))),
        ("training time", _duration(last.get("elapsed_s"))),
        ("throughput", f"{fmt(last.get('tokens_per_s'))} tokens/s" if last.get("tokens_per_s") else "–"),
        ("hardware", _hardware(config, train, last)),
        ("report written on", _this_machine()),
        ("best val loss", _best_line(best)),
    ]
    return "## Summary\n\n" + table(["item", "value"], rows)


def _data_counts(data: dict) -> str:
    counts = [f"source {data['source']}"] if data.get("source") else []
    counts += [f"{fmt(data[k])} {k.replace('_', ' ')}" for k in ("train_tokens", "val_tokens") if data.get(k)]
    return f" ({', '.join(counts)})" if counts else ""


def _model_line(run_dir: Path, config: dict) -> str:
    """Family, total and trainable parameters, shape: the model's own description (`aigc.models.kinds`)."""
    if not config.get("model"):
        return "not recorded"
    run_config = RunConfig.from_json(config)
    summary = describe_run(run_config)
    if summary.parameters is None:  # training records the counts; an imported run has its weights file
        stored = stored_parameter_count(run_dir / WEIGHTS)
        lora = run_config.weights.format == "lora"  # the file holds what trained, not the base
        summary = dataclasses.replace(summary, parameters=None if lora else stored, trainable=stored if lora else None)
    return summary.line()


def _hardware(config: dict, train: dict, last: dict) -> str:
    recorded = config.get("extra", {}).get("hardware")
    if isinstance(recorded, dict):  # what training recorded (artifacts.hardware)
        precision = config.get("extra", {}).get("precision") or {}
        why = precision.get("reason") if isinstance(precision, dict) else None
        return describe_hardware(recorded) + (f" (precision: {why})" if why else "")  # train/precision.py's reason
    for source in (last, config.get("extra", {})):
        for key in ("hardware", "device"):
            if source.get(key):
                return str(source[key])
    return f"not recorded by training (device setting `{train.get('device', 'auto')}`)"


def _this_machine() -> str:
    """The machine writing the report (where `aigc demo` also trained), described without importing torch."""
    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = "absent"
    cpu = platform.processor() or platform.machine()
    python = platform.python_version()
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPU cores, Python {python}, torch {torch_version}"


def _best_line(best: dict) -> str:
    if not best:
        return "–"
    extras = [f"perplexity {fmt(best.get('val_ppl'))}", f"{fmt(best.get('val_bpb'))} bits/byte"]
    return f"{fmt(best['val_loss'])} at step {fmt(best.get('step'))} ({', '.join(extras)})"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(float(seconds), 60)
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def curves_section(run_dir: Path) -> str:
    plots = sorted((run_dir / PLOTS).glob("*.png")) if (run_dir / PLOTS).is_dir() else []
    if not plots:
        return "## Training curves\n\nNo plots in this run (make them with `aigc plot`)."
    images = "\n\n".join(f"![{p.stem}](plots/{p.name})" for p in plots)
    return "## Training curves\n\n" + images


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------


def render_html(markdown: str, run_dir: Path, *, title: str) -> str:
    """Markdown → one self-contained HTML page: images become base64 data URIs."""
    from markdown_it import MarkdownIt  # deferred: only the HTML report needs it

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    default_image = md.renderer.rules["image"]

    def image(renderer, tokens, index, options, env):
        token = tokens[index]
        token.attrSet("src", _data_uri(run_dir / token.attrGet("src")))
        return default_image(tokens, index, options, env)

    md.add_render_rule("image", image)
    body = md.render(markdown)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_escape(title)}</title><style>{_CSS}</style></head>\n<body>\n{body}</body></html>\n"
    )


def _data_uri(path: Path) -> str:
    if not path.is_file():
        return ""
    kind = "image/png" if path.suffix.lower() == ".png" else "image/svg+xml" if path.suffix == ".svg" else "image/jpeg"
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _run_config_json(run_dir: Path) -> dict:
    """config.json through the run loader (so old layouts are migrated), as the dict the tables read."""
    try:
        return read_run_config(run_dir).to_json()
    except AigcError:  # a report still describes a run whose config is missing or damaged
        return {}


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None  # a damaged file must not stop the rest of the report; its section says so


def _relative_if_exists(run_dir: Path, name: str) -> str | None:
    return name if (run_dir / name).is_file() else None
