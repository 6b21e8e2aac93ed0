"""`RUN/metrics.jsonl` (one JSON object per evaluation) and, on request, TensorBoard event files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aigc.artifacts.run import METRICS, TENSORBOARD, read_metrics
from aigc.errors import AigcError
from aigc.fsutil import append_jsonl, write_text

TENSORBOARD_DIR = TENSORBOARD


def check_tensorboard(wanted: bool) -> None:
    """Fail before training starts, not at the first evaluation."""
    if not wanted:
        return
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        raise AigcError(
            "--tensorboard needs the tensorboard package; pip install 'aigc[tensorboard]' or drop the flag"
        ) from exc


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool):
        self.path = run_dir / METRICS
        self.writer = None
        if tensorboard:
            # Deferred: a slow import that only this path needs.
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def append(self, record: dict[str, Any]) -> None:
        append_jsonl(self.path, record)
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, global_step=record["step"])
            self.writer.flush()

    @staticmethod
    def truncate(run_dir: Path, step: int) -> None:
        """Drop records after `step` (written after the checkpoint a resume starts from)."""
        records = read_metrics(run_dir)
        kept = [r for r in records if r.get("step", 0) <= step]
        path = Path(run_dir) / METRICS
        # A torn last line (a crash mid-append) must go too, or the next record would be glued to it.
        torn = path.is_file() and path.stat().st_size > 0 and not _ends_with_newline(path)
        if len(kept) != len(records) or torn:
            write_text(Path(run_dir) / METRICS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, 2)
        return f.read(1) == b"\n"
