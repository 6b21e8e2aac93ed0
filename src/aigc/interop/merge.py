"""Fold a LoRA run's adapters into its weights, so it loads, exports and serves like any other run."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

from aigc.errors import AigcError
from aigc.models.lora import LoRASpec, count_parameters, merge_lora, save_adapters
from aigc.train.checkpoint import BEST, METRICS, TOKENIZER, WEIGHTS, load_run, read_run_config, save_config, save_weights

ADAPTER = "adapter.safetensors"


def merge_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *, overwrite: bool = False) -> tuple[Path, dict]:
    """Merge `run_dir` in place, or into `out_dir`. Returns the output folder and its parameter counts.

    The adapters alone are kept in `adapter.safetensors` (see `aigc.models.lora.load_adapters`).
    config.json is written last: a crash before it leaves the run's config pointing at adapters
    whose weights file is still the old one (each file is replaced atomically).
    """
    from aigc.interop.hf import prepare_out_dir

    src = Path(run_dir)
    config = read_run_config(src)
    if "lora" not in config.extra:
        raise AigcError(f"{src} has no LoRA adapters (its config.json has no extra.lora); nothing to merge")
    spec = LoRASpec.from_json(config.extra["lora"])
    out = src if out_dir is None else prepare_out_dir(out_dir, overwrite=overwrite)
    counts = {}
    for name in (WEIGHTS, BEST):
        if not (src / name).is_file():
            continue
        model = load_run(src, weights=name).model
        if name == WEIGHTS:
            save_adapters(model, spec, out / ADAPTER)
        merge_lora(model)
        counts = count_parameters(model)
        save_weights(model, out / name)
    if out != src:
        shutil.copyfile(src / TOKENIZER, out / TOKENIZER)
        if (src / METRICS).is_file():
            shutil.copyfile(src / METRICS, out / METRICS)
    extra = {key: value for key, value in config.extra.items() if key != "lora"}
    extra.update(merged_lora=spec.to_json(), parameters=counts)
    save_config(out, dataclasses.replace(config, extra=extra))
    return out, counts
