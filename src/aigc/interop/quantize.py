"""`aigc export --format int8`: write a run folder whose linear layers are dynamically quantized.

The quantization itself, and loading such a folder, live in `aigc.models.int8`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from safetensors.torch import save_file

from aigc.artifacts.run import (
    METRICS,
    TOKENIZER,
    WEIGHTS,
    Run,
    Weights,
    copy_chat_template,
    prepare_out_dir,
    require_plain_weights,
    save_config,
)
from aigc.fsutil import write_with
from aigc.models.int8 import SCHEME, int8_state, quantize_int8


def export_int8(run: Run, out_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write an int8 run folder: config (marked int8), tokenizer, int8 weights, metrics.

    LoRA adapters are folded in first (by `quantize_int8`); an int8 run is refused: precision is gone."""
    if run.config.weights.format in ("int8", "quantized"):
        require_plain_weights(run.config, run.path, "int8 export", verb="export")
    out = prepare_out_dir(out_dir, overwrite=overwrite)
    tensors = int8_state(quantize_int8(run.model))
    extra = dict(run.config.extra)
    if run.config.weights.lora is not None:
        extra["merged_lora"] = run.config.weights.lora
    weights = Weights(format="int8", quantization={**SCHEME, "source": str(run.path.resolve())})
    config = dataclasses.replace(run.config, weights=weights, extra=extra)
    write_with(out / WEIGHTS, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "aigc-int8"}))
    run.tokenizer.save(out / TOKENIZER)
    copy_chat_template(run.path, out)
    if (run.path / METRICS).is_file():
        shutil.copyfile(run.path / METRICS, out / METRICS)
    save_config(out, config)
    return out
