"""`aigc export RUN --format hf|int8|gguf|ollama|peft|q8_0|q4... --out DIR`: take a run to other tools, or shrink it."""

from __future__ import annotations

import argparse
import sys
import time

FORMATS = ("hf", "int8", "gguf", "ollama", "peft")
QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")  # = gguf_export.QUANT_TYPES
# Quantised runs in GGUF's block layout (aigc.interop.quant_export.FORMATS; q4 = q4_0), listed here so
# that `aigc --help` does not import gguf.
QUANTISED_FORMATS = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export a run as a Hugging Face folder, a GGUF file (llama.cpp, Ollama), peft adapters, or int8",
        description=(
            "--format hf writes config.json, model.safetensors, tokenizer files, generation_config.json and a "
            "model card that transformers (and vLLM/TGI) load offline; GPT runs only. --format int8 writes a run "
            "folder with dynamically quantized int8 linear layers that every aigc command can open. "
            "--format gguf writes model-QUANT.gguf for llama.cpp and LM Studio (LoRA runs merged); --format ollama "
            "adds a Modelfile for `ollama create`. --format peft writes a LoRA run's adapters as peft reads them "
            "(adapter_config.json, adapter_model.safetensors) plus its base as a Hugging Face folder (base/). "
            "--format q8_0/q4_0/q4_1/q5_0/q5_1 (q4 = q4_0) writes a run whose linear layers are GGML blocks of "
            "that type (the embedding and output head in Q8_0), computed with as they are, as an imported GGUF is."
        ),
    )
    parser.add_argument("run", metavar="RUN", help="run folder made by aigc train (or aigc import)")
    parser.add_argument(
        "--format",
        choices=FORMATS + QUANTISED_FORMATS,
        required=True,
        help="hf: Hugging Face folder; int8: quantized run; gguf: llama.cpp file; ollama: GGUF + Modelfile; "
        "peft: LoRA adapters + base; q8_0 ... q4: aigc run of GGML blocks",
    )
    parser.add_argument(
        "--quant",
        choices=QUANTS,
        default=None,
        help="GGUF tensor type of the matrices (gguf, ollama; default f16); norms stay f32. "
        "For K-quants run llama.cpp's llama-quantize on the f16 file",
    )
    parser.add_argument("--system", default=None, help="system prompt for the Ollama Modelfile (ollama)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must be new or empty)")
    parser.add_argument(
        "--best", action="store_true", help="export best.safetensors (lowest val loss) instead of the latest weights"
    )
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty --out folder")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    # Deferred: a slow import that only this path needs.
    from aigc.artifacts.run import BEST, WEIGHTS
    from aigc.models import load_run

    _check_options(args)  # before a model is loaded
    started = time.perf_counter()
    run = load_run(args.run, weights=BEST if args.best else WEIGHTS)
    out = _export(run, args)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(
        f"exported {args.run} as {args.format} to {out} ({size / 1e6:.1f} MB, {time.perf_counter() - started:.1f}s)",
        file=sys.stderr,
    )
    return 0


def _check_options(args: argparse.Namespace) -> None:
    """--quant and --system only where they mean something."""
    from aigc.errors import AigcError  # deferred with the rest of this command's imports

    if args.quant is not None and args.format not in ("gguf", "ollama"):
        raise AigcError(f"--quant applies to --format gguf or ollama, not {args.format}")
    if args.system is not None and args.format != "ollama":
        raise AigcError(f"--system applies to --format ollama, not {args.format}")


def _export(run, args: argparse.Namespace):
    """Call the library function for `--format`."""
    # Deferred: each pulls in torch, gguf or safetensors.
    from aigc.interop.gguf_export import export_gguf
    from aigc.interop.hf import export_hf
    from aigc.interop.ollama import export_ollama
    from aigc.interop.peft_export import export_peft
    from aigc.interop.quant_export import export_quantised
    from aigc.interop.quantize import export_int8

    if args.format in QUANTISED_FORMATS:
        return export_quantised(run, args.out, format=args.format, overwrite=args.overwrite)
    quant = args.quant or "f16"
    if args.format == "gguf":
        return export_gguf(run, args.out, quant=quant, overwrite=args.overwrite)
    if args.format == "ollama":
        return export_ollama(run, args.out, quant=quant, system=args.system, overwrite=args.overwrite)
    exporter = {"hf": export_hf, "int8": export_int8, "peft": export_peft}[args.format]
    return exporter(run, args.out, overwrite=args.overwrite)
