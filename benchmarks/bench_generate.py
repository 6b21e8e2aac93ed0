"""Generation speed: aigc's decode loop vs Hugging Face `GPT2LMHeadModel.generate`, side by side.

Both models have the shape of the `small` preset (vocabulary 8192) and the SAME random weights (ours
copied into the `transformers` model), so greedy decoding must give the same tokens; the script checks
that, then times 256 new tokens at batch 1 and 16 (end-of-text suppressed in both, so every row makes
all 256 tokens). Each row starts from `<|endoftext|>` alone, so the 256-token context holds exactly
the fed tokens. Ours includes its per-token text decoding and events; `transformers` returns ids only.

    python benchmarks/bench_generate.py [--new-tokens 256] [--batches 1 16] [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch

from aigc.config import SampleConfig, model_preset
from aigc.generate import Request, generate
from aigc.models import build_model
from aigc.tokenizer import Tokenizer


def corpus_tokenizer(vocab_size: int) -> Tokenizer:
    """A real 8192-token BPE vocabulary, trained on the Python standard library's sources (always there)."""
    files = sorted(Path(json.__file__).parent.parent.glob("*.py"))
    texts = (path.read_text(encoding="utf-8", errors="replace") for path in files)
    return Tokenizer.train(texts, vocab_size=vocab_size)


def to_transformers(model, eot_id: int):
    """A GPT2LMHeadModel with our model's weights (GPT-2's Conv1D stores weights transposed)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    hf_config = GPT2Config(
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=1e-5,
        bos_token_id=eot_id,
        eos_token_id=eot_id,
    )
    hf = GPT2LMHeadModel(hf_config).eval()
    state = {}
    for name, tensor in model.state_dict().items():
        transposed = name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight"))
        state[name if name.startswith("lm_head") else f"transformer.{name}"] = tensor.t() if transposed else tensor
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and all(".attn.bias" in k or ".attn.masked_bias" in k for k in missing), missing
    return hf


def best_times(runs, repeats: int) -> tuple[list[float], list[float], list]:
    """Fastest wall-clock and CPU time of `repeats` calls of each function (after one warm-up each),
    interleaved so that a busy spell on a shared machine hits every side alike; and the last results."""
    results = [run() for run in runs]
    wall, cpu = [float("inf")] * len(runs), [float("inf")] * len(runs)
    for _ in range(repeats):
        for i, run in enumerate(runs):
            wall_start, cpu_start = time.perf_counter(), time.process_time()
            results[i] = run()
            wall[i] = min(wall[i], time.perf_counter() - wall_start)
            cpu[i] = min(cpu[i], time.process_time() - cpu_start)
    return wall, cpu, results


def contenders(batch: int, new_tokens: int, model, hf, tokenizer) -> list:
    """Four functions returning the generated ids per row: our `generate`, `transformers` `generate`,
    and each model's bare forward passes in a greedy loop (the floor that any decode loop adds to)."""
    config = SampleConfig(temperature=0.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    requests = [Request("", config=config)] * batch
    start = torch.full((batch, 1), tokenizer.eot_id, dtype=torch.long)

    def ours():
        return [c.token_ids for c in generate(model, tokenizer, requests)]

    @torch.inference_mode()
    def theirs():
        out = hf.generate(
            start,
            attention_mask=torch.ones_like(start),
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            eos_token_id=tokenizer.eot_id,
            pad_token_id=tokenizer.pad_id,
        )
        return [tuple(row) for row in out[:, 1:].tolist()]

    @torch.inference_mode()
    def our_forward():
        cache, x = model.new_cache(batch), start
        for _ in range(new_tokens):
            x = model(x, cache=cache)[0][:, -1].argmax(dim=-1, keepdim=True)

    @torch.inference_mode()
    def their_forward():
        from transformers import DynamicCache

        cache, x = DynamicCache(config=hf.config), start
        for _ in range(new_tokens):
            x = hf(x, past_key_values=cache, use_cache=True).logits[:, -1].argmax(dim=-1, keepdim=True)

    return [ours, theirs, our_forward, their_forward]


def bench(batch: int, new_tokens: int, repeats: int, model, hf, tokenizer) -> dict:
    # The forward-only loops feed one token more than generate needs; drop it from their count.
    runs = contenders(batch, new_tokens - 1, model, hf, tokenizer)[2:]
    wall, cpu, results = best_times(contenders(batch, new_tokens, model, hf, tokenizer)[:2] + runs, repeats)
    tokens = batch * new_tokens
    return {
        "batch": batch,
        "aigc_tokens_per_s": round(tokens / wall[0], 1),
        "transformers_tokens_per_s": round(tokens / wall[1], 1),
        "speedup": round(wall[1] / wall[0], 2),
        "speedup_cpu_time": round(cpu[1] / cpu[0], 2),
        "forward_only_speedup": round(wall[3] / wall[2], 2),
        "same_tokens": results[0] == results[1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed-argument notices
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    torch.manual_seed(0)
    # The small preset's shape, with the context stretched to hold the prompt plus every new token:
    # transformers cannot slide its window, and sliding ours would not be a like-for-like comparison.
    small = model_preset("small", vocab_size=8192)
    model = build_model(
        model_preset("small", vocab_size=8192, block_size=max(small.block_size, args.new_tokens + 1))
    ).eval()
    tokenizer = corpus_tokenizer(8192)
    hf = to_transformers(model, tokenizer.eot_id)
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
        f"small preset, {model.num_params():,} parameters, {args.new_tokens} new tokens, greedy",
        file=sys.stderr,
    )
    print(
        "| batch | aigc tokens/s | transformers tokens/s | speed-up | speed-up (CPU time) "
        "| forward-only speed-up | same tokens |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | :---: |")
    results = []
    for batch in args.batches:
        row = bench(batch, args.new_tokens, args.repeats, model, hf, tokenizer)
        results.append(row)
        print(
            f"| {batch} | {row['aigc_tokens_per_s']} | {row['transformers_tokens_per_s']} | "
            f"{row['speedup']}x | {row['speedup_cpu_time']}x | {row['forward_only_speedup']}x | "
            f"{'yes' if row['same_tokens'] else 'NO'} |",
            flush=True,
        )
    print(json.dumps(results))
    return 0 if all(r["same_tokens"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
