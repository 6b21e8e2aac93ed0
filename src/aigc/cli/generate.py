"""`aigc generate RUN`: sample text from a trained run. Standard output carries only the generated
text (or JSON), so it can be piped; progress, warnings and timings go to standard error."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from aigc.cli.args import add_dataclass_args, dataclass_from_args, text
from aigc.cli.structured import add_structured_args, grammar_from_args
from aigc.config import DEVICES, SampleConfig
from aigc.errors import AigcError
from aigc.fsutil import read_user_text

MAX_SAMPLES = 64


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate text from a trained run",
        description=(
            "Sample text from RUN, optionally continuing --prompt and conditioned on --label. Prints "
            "only the generated text (prompt excluded) on standard output; --json prints one JSON "
            "object per sample. Timings and warnings go to standard error."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_run_args(parser)
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--prompt", default="", type=text("--prompt"), help="text to continue; empty starts a new document"
    )
    source.add_argument("--prompt-file", type=Path, help="read the prompt from this UTF-8 file")
    parser.add_argument("-n", "--num-samples", type=int, default=1, help=f"samples to generate (1..{MAX_SAMPLES})")
    parser.add_argument("--label", type=text("--label"), help="condition on this label's control token (e.g. pos)")
    parser.add_argument(
        "--negative-prompt",
        default="",
        type=text("--negative-prompt"),
        help="with --guidance-scale: text to steer away from (e.g. the opposite opinion)",
    )
    parser.add_argument(
        "--negative-label",
        type=text("--negative-label"),
        help="with --guidance-scale: a label to steer away from (e.g. neg)",
    )
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--json", action="store_true", help="print one JSON object per sample (JSON lines)")
    add_structured_args(parser)
    add_dataclass_args(parser, SampleConfig)
    parser.set_defaults(handler=handle)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """RUN and --device, shared with `aigc batch`."""
    parser.add_argument("run", help="run folder made by `aigc train`")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="where to run: auto = cuda > mps > cpu")


def load(args: argparse.Namespace):
    """The run named on the command line, on the requested device."""
    # Deferred: a slow import that only this path needs.
    from aigc.artifacts.device import pick_device
    from aigc.models import load_run

    return load_run(args.run, device=pick_device(args.device))


def warn_if_truncated(run, prompt: str, label: str | None, command: str) -> None:
    """Tell the user when a prompt is longer than the context and only its end will be used."""
    # Deferred: a slow import that only this path needs.
    from aigc.generate import Request, context_limit, prompt_prefix

    limit = context_limit(run.model)
    prefix = len(prompt_prefix(run.tokenizer, Request(prompt, label)))  # <|endoftext|> and the label token
    tokens = len(run.tokenizer.encode(prompt))
    if limit is not None and prefix + tokens > limit:
        print(
            f"aigc {command}: warning: the prompt is {tokens} tokens but the model's context holds {limit}; "
            f"only its last {limit - prefix} tokens are used",
            file=sys.stderr,
        )


def handle(args: argparse.Namespace) -> int:
    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise AigcError(f"-n must be in [1, {MAX_SAMPLES}], got {args.num_samples}")
    config = dataclass_from_args(args, SampleConfig)
    prompt = _read_prompt(args)
    grammar = grammar_from_args(args)

    # Deferred: a slow import that only this path needs.
    from aigc.generate import Request, decode_stream, generate

    run = load(args)
    warn_if_truncated(run, prompt, args.label, "generate")
    requests = [
        Request(
            prompt,
            args.label,
            _nth_seed(config, i),
            negative_prompt=args.negative_prompt,
            negative_label=args.negative_label,
            grammar=grammar,
        )
        for i in range(args.num_samples)
    ]
    started = time.perf_counter()
    if args.stream:
        completions = _print_stream(decode_stream(run.model, run.tokenizer, requests), args)
    else:
        completions = generate(run.model, run.tokenizer, requests)
    elapsed = time.perf_counter() - started
    if args.json or not args.stream:
        for completion in completions:
            _print_completion(completion, args, run.tokenizer)
    tokens = sum(len(c.token_ids) for c in completions)
    print(
        f"aigc generate: {len(completions)} sample(s), {tokens} tokens in {elapsed:.2f} s "
        f"({tokens / max(elapsed, 1e-9):.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt_file is None:
        return args.prompt
    try:
        return read_user_text(args.prompt_file, what="prompt file")
    except FileNotFoundError:
        raise AigcError(f"prompt file not found: {args.prompt_file}; check the path") from None


def _nth_seed(config: SampleConfig, n: int) -> SampleConfig:
    """Sample n gets seed + n, so -n 3 --seed 1 gives three different, reproducible samples."""
    return config if config.seed is None else dataclasses.replace(config, seed=config.seed + n)


def _print_stream(stream, args: argparse.Namespace) -> list:
    """Print sample 1 token by token; the other samples decode alongside it and are printed after it.
    With --json, print one object per token instead."""
    later: dict[int, list[str]] = {}
    if args.num_samples > 1 and not args.json:
        _separator(0, args.num_samples)
    for event in stream:
        if args.json:
            record = {"object": "token", "index": event.index, "token_id": event.token_id, "text": event.text}
            print(json.dumps({**record, "logprob": event.logprob}, ensure_ascii=False), flush=True)
        elif event.index == 0:
            sys.stdout.write(event.text)
            sys.stdout.flush()
        else:
            later.setdefault(event.index, []).append(event.text)
    completions = stream.completions
    if not args.json:
        sys.stdout.write("\n")
        for index in range(1, len(completions)):
            _separator(index, len(completions))
            sys.stdout.write("".join(later.get(index, [])) + "\n")
        sys.stdout.flush()
    return completions


def _separator(index: int, total: int) -> None:
    sys.stdout.flush()
    print(f"--- sample {index + 1}/{total} ---", file=sys.stderr, flush=True)


def _print_completion(completion, args: argparse.Namespace, tokenizer) -> None:
    if completion.complete is False:  # structured output cut short: say so, the text does not parse
        print(
            f"aigc generate: sample {completion.index}: the JSON is incomplete "
            f"(finish_reason {completion.finish_reason}); raise --max-new-tokens or bound the schema's strings",
            file=sys.stderr,
        )
    if not args.json:
        if args.num_samples > 1:
            _separator(completion.index, args.num_samples)
        print(completion.text, flush=True)
        return
    record = {
        "object": "sample",
        "index": completion.index,
        "text": completion.text,
        "token_ids": list(completion.token_ids),
        "tokens": [tokenizer.decode([i], skip_special=False) for i in completion.token_ids],
        "finish_reason": completion.finish_reason,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": len(completion.token_ids),
    }
    if completion.complete is not None:
        record["json_complete"] = completion.complete
    if completion.logprobs is not None:
        record["logprobs"] = [
            {
                "token": tokenizer.decode([e.token_id], skip_special=False),
                "logprob": e.logprob,
                "top_logprobs": [{"token": t, "logprob": lp} for t, lp in e.top_logprobs],
            }
            for e in completion.logprobs
        ]
    print(json.dumps(record, ensure_ascii=False), flush=True)
