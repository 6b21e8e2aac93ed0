"""Generation speed on a real model: aigc's decode loop vs `transformers` `generate` on SmolLM2-135M.

Both sides hold the SAME weights: the pulled run `smollm2-135m` (`aigc pull smollm2-135m`; set
AIGC_HOME to where it was pulled) and a `LlamaForCausalLM` built from it with
`aigc.interop.llama.state_dict_to_hf` / `hf_config_from`. Greedy, end-of-text suppressed on both
sides, so every row makes all `--new-tokens` tokens; every timed run checks that ours and theirs
produced the same tokens (fp32), and how many of our int8 path's tokens agree with our fp32 ones.
Ours is `aigc.generate.generate` (prefill, sampling, per-token text decoding and events included);
theirs returns ids only. Each row's context is `<|endoftext|>` + the prompt, the same ids both sides;
the rows share one prompt, which ours prefills once for all of them (`--distinct-prompts` gives each
row its own, left-padded on both sides, to time the batch without that).

Contenders, run in interleaved rounds (a busy spell on a shared machine hits all alike), best of
`--repeats` after one warm-up each: `aigc` fp32, `aigc` int8 (`quantize_int8`), `transformers` fp32.
Prefill: one `--prefill`-token prompt through a fresh cache, logits of the last position only.

    AIGC_HOME=/tmp/aigc_home python benchmarks/bench_smollm2.py [--new-tokens 128] [--batches 1 16]
        [--repeats 3] [--prefill 512] [--threads N] [--distinct-prompts]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from aigc.config import SampleConfig
from aigc.generate import Request, encode_request, generate
from aigc.interop.llama import hf_config_from, state_dict_to_hf
from aigc.models import load_run
from aigc.models.int8 import quantize_int8

PROMPT = "The history of artificial intelligence began in antiquity, with myths and stories of"


def cpu_flags() -> str:
    """The CPU's model name and its vector extensions (the kernels each side may pick)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"model name\s*:\s*(.*)", text)
    flags = sorted(set(re.findall(r"\b(avx2|avx512[a-z_0-9]*|amx[a-z_0-9]*)\b", text)))
    return f"{name.group(1) if name else 'unknown CPU'}, {os.cpu_count()} CPUs: {' '.join(flags) or 'no AVX2'}"


def to_transformers(model):
    """A LlamaForCausalLM holding our model's weights (q/k/v and gate/up split apart, head tied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hf = LlamaForCausalLM(LlamaConfig(**hf_config_from(model.config))).eval()
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(model.state_dict(), model.config), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return hf


def contenders(batch: int, new_tokens: int, models: dict, hf, tokenizer, distinct: bool = False) -> dict:
    """name -> function returning the generated ids of every row (a list of tuples). `distinct`: row i's
    prompt starts with "i." so that no two rows share a context (ours prefills identical ones once)."""
    config = SampleConfig(temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens, repetition_penalty=1.0)
    requests = [Request(f"{row}. {PROMPT}" if distinct else PROMPT, config=config) for row in range(batch)]
    contexts = [encode_request(tokenizer, request) for request in requests]
    width = max(len(ids) for ids in contexts)
    ids = torch.tensor([[tokenizer.pad_id] * (width - len(c)) + c for c in contexts])  # (B, T), left-padded
    attention_mask = torch.tensor([[0] * (width - len(c)) + [1] * len(c) for c in contexts])

    def ours(model):
        return lambda: [c.token_ids for c in generate(model, tokenizer, requests)]

    @torch.inference_mode()
    def theirs():
        out = hf.generate(
            ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=tokenizer.eot_id,
            pad_token_id=tokenizer.pad_id,
        )
        return [tuple(row) for row in out[:, ids.shape[1] :].tolist()]

    return {**{f"aigc {name}": ours(m) for name, m in models.items()}, "transformers fp32": theirs}


def best_times(runs: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Fastest wall-clock and CPU time per contender over `repeats` interleaved rounds (after one
    warm-up each), and the results of every round (so each round's tokens are checked)."""
    results = {name: [run()] for name, run in runs.items()}
    wall, cpu = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            results[name].append(run())
            wall[name] = min(wall[name], time.perf_counter() - wall_start)
            cpu[name] = min(cpu[name], time.process_time() - cpu_start)
    return wall, cpu, results


def agreement(a: list[tuple], b: list[tuple]) -> float:
    """Fraction of positions where two greedy decodes agree (1.0 = the same tokens)."""
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)]
    return sum(x == y for x, y in pairs) / max(len(pairs), 1)


def bench_decode(batch: int, args, models: dict, hf, tokenizer) -> dict:
    runs = contenders(batch, args.new_tokens, models, hf, tokenizer, args.distinct_prompts)
    wall, cpu, results = best_times(runs, args.repeats)
    ours, theirs = results["aigc fp32"], results["transformers fp32"]
    tokens = batch * args.new_tokens
    row = {"batch": batch, **{f"{name} tokens/s": round(tokens / t, 1) for name, t in wall.items()}}
    row["fp32 speed-up"] = round(wall["transformers fp32"] / wall["aigc fp32"], 2)
    row["int8 speed-up"] = round(wall["transformers fp32"] / wall["aigc int8"], 2)
    row["int8 / our fp32"] = round(wall["aigc fp32"] / wall["aigc int8"], 2)
    row["fp32 speed-up (CPU time)"] = round(cpu["transformers fp32"] / cpu["aigc fp32"], 2)
    row["same tokens"] = all(o == t for o, t in zip(ours, theirs)) and all(o == ours[0] for o in ours)
    row["int8 tokens = fp32"] = round(min(agreement(o, ours[0]) for o in results["aigc int8"]), 3)
    return row


def bench_prefill(length: int, repeats: int, models: dict, hf) -> dict:
    idx = torch.randint(0, hf.config.vocab_size - 1, (1, length), generator=torch.Generator().manual_seed(0))

    def ours(model):
        return torch.inference_mode()(lambda: model(idx, cache=model.new_cache(1), last_only=True)[0][0, -1])

    @torch.inference_mode()
    def theirs():
        return hf(idx, use_cache=True, logits_to_keep=1).logits[0, -1]

    runs = {**{f"aigc {name}": ours(m) for name, m in models.items()}, "transformers fp32": theirs}
    wall, _, results = best_times(runs, repeats)
    row = {f"prefill {name} tokens/s": round(length / t, 1) for name, t in wall.items()}
    diff = (results["aigc fp32"][-1] - results["transformers fp32"][-1]).abs().max().item()
    row["prefill fp32 speed-up"] = round(wall["transformers fp32"] / wall["aigc fp32"], 2)
    row["prefill max |logit difference|"] = float(f"{diff:.2g}")
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="smollm2-135m", help="a run folder or pulled name (Llama-style)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill", type=int, default=512, help="prompt length for the prefill figure; 0 = skip")
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    parser.add_argument(
        "--distinct-prompts", action="store_true", help='row i\'s prompt starts "i. ": no shared prefill, some padding'
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # transformers' and torch.ao's deprecation notices
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    run = load_run(args.run)
    models = {"fp32": run.model.eval(), "int8": quantize_int8(run.model)}
    hf = to_transformers(run.model)
    print(
        f"{cpu_flags()}\ntorch {torch.__version__}, transformers {transformers.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start; "
        f"{args.run}: {run.model.num_params():,} parameters, {args.new_tokens} new tokens, greedy",
        file=sys.stderr,
    )
    report = []
    for batch in args.batches:
        report.append(bench_decode(batch, args, models, hf, run.tokenizer))
        print(json.dumps(report[-1]), flush=True)
    if args.prefill:
        report.append(bench_prefill(args.prefill, args.repeats, models, hf))
        print(json.dumps(report[-1]), flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)
    return 0 if all(r.get("same tokens", True) for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
