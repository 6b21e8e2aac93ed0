"""Figures from run files: training curves (loss, accuracy) read from `RUN/metrics.jsonl`.

Each figure has two panels, the same curves over optimizer steps (left) and over training tokens
(right), so runs with different batch sizes still compare. Train is dashed, validation solid, one
colour per run. Files are written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from aigc.artifacts.run import METRICS, PLOTS, read_metrics
from aigc.errors import AigcError
from aigc.fsutil import write_with

PLOTS_DIR = PLOTS
# (file name, title, y label, train key, val key)
CURVES = (
    ("loss.png", "Loss", "cross-entropy (nats per token)", "train_loss", "val_loss"),
    ("accuracy.png", "Next-token accuracy", "accuracy", "train_acc", "val_acc"),
)


def _figure_module():
    """matplotlib with a file-only backend (no display needed), imported on first use."""
    # Deferred: a slow import that only this path needs.
    import matplotlib

    matplotlib.use("Agg")
    # Deferred: a slow import that only this path needs.
    import matplotlib.pyplot as plt

    return plt


def _load(run_dir: Path) -> list[dict]:
    if not run_dir.is_dir():
        raise AigcError(f"run folder not found: {run_dir}; pass a folder made by `aigc train`")
    records = [r for r in read_metrics(run_dir) if "step" in r]
    if not records:
        raise AigcError(
            f"{run_dir} has no metrics yet ({METRICS} is missing, empty or damaged); train it past its first "
            "evaluation (--eval-every)"
        )
    return records


def plot_runs(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Write loss.png and accuracy.png for one run, or overlaid for several.

    out_dir defaults to the first run's `plots/` folder. Returns the paths written."""
    if not run_dirs:
        raise AigcError("no run given; pass one or more run folders")
    paths = [Path(p) for p in run_dirs]
    runs = [(_run_name(p, paths), _load(p)) for p in paths]
    target = Path(out_dir) if out_dir is not None else paths[0] / PLOTS_DIR
    return [_plot_curve(runs, target / name, title, ylabel, tkey, vkey) for name, title, ylabel, tkey, vkey in CURVES]


def _run_name(path: Path, all_paths: list[Path]) -> str:
    """The folder name, or the last two parts when two runs share a folder name."""
    names = [p.name for p in all_paths]
    return path.name if names.count(path.name) == 1 else f"{path.parent.name}/{path.name}"


def _plot_curve(
    runs: list[tuple[str, list[dict]]], path: Path, title: str, ylabel: str, train_key: str, val_key: str
) -> Path:
    plt = _figure_module()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True, constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, records) in enumerate(runs):
        color = colors[i % len(colors)]
        label = f"{name} " if len(runs) > 1 else ""
        for ax, x_key in zip(axes, ("step", "tokens")):
            xs = [r.get(x_key, 0) for r in records]
            for key, style, split in ((train_key, "--", "train"), (val_key, "-", "validation")):
                points = [(x, r[key]) for x, r in zip(xs, records) if r.get(key) is not None]
                if points:
                    ax.plot(*zip(*points), style, color=color, marker="o", markersize=3, label=f"{label}{split}")
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training tokens")
    axes[0].set_ylabel(ylabel)
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 4))
    axes[0].legend(loc="best", fontsize="small")
    heading = runs[0][0] if len(runs) == 1 else f"{len(runs)} runs"
    fig.suptitle(f"{title}: train vs validation ({heading})")
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def comparison_chart(
    names: Sequence[str], rows: Sequence[tuple[str, bool, Sequence[float | None]]], path: str | os.PathLike
) -> Path:
    """Bar chart comparing runs: one small panel per metric (scales differ), one colour per run.

    `rows` are (metric name, higher is better, one value per run; None = not measured), as made by
    `aigc.evaluate.compare.comparison_rows`. Written atomically; returns the path.
    """
    if not rows:
        raise AigcError("no metric to compare: none of the runs has evaluation results; run `aigc eval` on them")
    plt = _figure_module()
    columns = min(4, len(rows))
    lines = -(-len(rows) // columns)  # ceiling division
    fig, axes = plt.subplots(
        lines, columns, figsize=(3.2 * columns, 2.6 * lines), squeeze=False, constrained_layout=True
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (metric, higher, values) in zip(axes.flat, rows):
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(range(len(names)), heights, color=[colors[i % len(colors)] for i in range(len(names))])
        for bar, value in zip(bars, values):
            label = "n/a" if value is None else f"{value:.3g}"
            ax.annotate(
                label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8
            )
        ax.set_title(f"{metric} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.margins(y=0.2)
        if max(heights, default=0.0) <= 0.0 <= min(heights, default=0.0):
            ax.set_ylim(0, 1)  # all zero: keep the axis at 0..1 rather than centred on 0
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    fig.suptitle(f"aigc eval: {' vs '.join(names)}")
    path = Path(path)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path
