"""Fold a LoRA run's adapters into its weights, so it loads, exports and serves like any other run."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from aigc.artifacts.run import (
    BEST,
    METRICS,
    TOKENIZER,
    WEIGHTS,
    Weights,
    copy_chat_template,
    prepare_out_dir,
    read_run_config,
    save_config,
    save_weights,
)
from aigc.errors import AigcError
from aigc.models import load_run
from aigc.models.lora import LoRASpec, merge_lora, parameter_counts, save_adapters

ADAPTER = "adapter.safetensors"


def merge_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, overwrite: bool = False
) -> tuple[Path, dict]:
    """Merge `run_dir` in place, or into `out_dir`. Returns the output folder and its parameter counts.

    The adapters alone are kept in `adapter.safetensors` (see `aigc.models.lora.load_adapters`).
    config.json is written last: a crash before it leaves the run's config pointing at adapters
    whose weights file is still the old one (each file is replaced atomically).
    """
    src = Path(run_dir)
    config = read_run_config(src)
    if config.weights.format != "lora":
        raise AigcError(f"{src} has no LoRA adapters (its weights are {config.weights.format}); nothing to merge")
    spec = LoRASpec.from_json(config.weights.lora)
    out = src if out_dir is None else prepare_out_dir(out_dir, overwrite=overwrite)
    counts = {}
    for name in (WEIGHTS, BEST):
        if not (src / name).is_file():
            continue
        model = load_run(src, weights=name).model
        if name == WEIGHTS:
            save_adapters(model, spec, out / ADAPTER)
        merge_lora(model)
        counts = parameter_counts(model)
        save_weights(model, out / name)
    if out != src:
        shutil.copyfile(src / TOKENIZER, out / TOKENIZER)
        copy_chat_template(src, out)
        if (src / METRICS).is_file():
            shutil.copyfile(src / METRICS, out / METRICS)
    extra = {**config.extra, "merged_lora": spec.to_json(), "parameters": counts}
    save_config(out, dataclasses.replace(config, weights=Weights(), extra=extra))
    return out, counts
