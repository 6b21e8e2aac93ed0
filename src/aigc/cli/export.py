"""`aigc export RUN --format hf|int8 --out DIR`: share a run as a Hugging Face folder, or shrink it to int8."""

from __future__ import annotations

import argparse
import sys
import time

FORMATS = ("hf", "int8")
# Quantised runs in GGUF's block layout (aigc.interop.quant_export.FORMATS; q4 = q4_0), listed here so
# that `aigc --help` does not import gguf.
QUANTISED_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a run as a Hugging Face GPT-2 folder, or as an int8 run for CPU inference",
        description=(
            "--format hf writes config.json, model.safetensors, tokenizer files, generation_config.json and a "
            "model card that transformers (and vLLM/TGI) load offline; GPT runs only. --format int8 writes a run "
            "folder with dynamically quantized int8 linear layers that every aigc command can open. "
            "--format q8_0/q4_0/q4_1/q5_0/q5_1 (q4 = q4_0) writes a run whose linear layers are GGML blocks of "
            "that type (the embedding and output head in Q8_0), computed with as they are, as an imported GGUF is."
        ),
    )
    parser.add_argument("run", metavar="RUN", help="run folder made by aigc train (or aigc import)")
    parser.add_argument(
        "--format",
        choices=FORMATS + QUANTISED_FORMATS,
        required=True,
        help="hf: Hugging Face folder; int8: quantized run; q8_0 ... q4: run of GGML blocks",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must be new or empty)")
    parser.add_argument(
        "--best", action="store_true", help="export best.safetensors (lowest val loss) instead of the latest weights"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    # Deferred: a slow import that only this path needs.
    from aigc.artifacts.run import BEST, WEIGHTS
    from aigc.interop.hf import export_hf
    from aigc.interop.quantize import export_int8
    from aigc.models import load_run

    started = time.perf_counter()
    run = load_run(args.run, weights=BEST if args.best else WEIGHTS)
    if args.format in QUANTISED_FORMATS:
        from aigc.interop.quant_export import export_quantised  # deferred: imports gguf

        out = export_quantised(run, args.out, format=args.format, overwrite=args.overwrite)
    else:
        exporter = export_hf if args.format == "hf" else export_int8
        out = exporter(run, args.out, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(
        f"exported {args.run} as {args.format} to {out} ({size / 1e6:.1f} MB, {time.perf_counter() - started:.1f}s)",
        file=sys.stderr,
    )
    return 0
