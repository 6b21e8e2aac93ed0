"""The model's own speed, A/B within one process: greedy decode steps and a prefill, timed interleaved.

Variants of the same weights (the `small` preset, vocabulary 8192, or `--preset`):
- `current`: this checkout's GPT, with the packed output layer (aigc.models.packed) where available;
- `no-packed`: the same with the packed layer forced off (the plain `nn.Linear` fallback);
- `baseline`: with `--baseline FILE`, the GPT class of another gpt.py, e.g. an older commit's
  (`git show REV:src/aigc/models/gpt.py > /tmp/gpt_old.py`).
Prefill: one 512-token prompt (block size raised to fit), logits for every position or the last only.
Interleaving means a busy spell on a shared machine hits every variant alike; best of `--repeats`.

    python benchmarks/bench_forward.py [--new-tokens 128] [--batches 1 16] [--repeats 5] [--baseline FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from unittest import mock

import torch

from aigc.config import model_preset
from aigc.models import build_model, packed


def load_baseline(path: str):
    spec = importlib.util.spec_from_file_location("gpt_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.GPT


def decode_loop(model, batch: int, new_tokens: int, *, use_packed: bool = True):
    """A function that runs `new_tokens` greedy steps of one token per row from a fresh cache."""
    start = torch.zeros(batch, 1, dtype=torch.long)

    @torch.inference_mode()
    def run():
        with mock.patch.object(packed, "onednn_linear_available", lambda: use_packed and _onednn()):
            cache, x, out = model.new_cache(batch), start, []
            for _ in range(new_tokens):
                x = model(x, cache=cache)[0][:, -1].argmax(dim=-1, keepdim=True)
                out.append(x)
            return torch.cat(out, dim=1)

    return run


_onednn = packed.onednn_linear_available


def prefill(model, length: int, last_only: bool):
    idx = torch.randint(0, model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    kwargs = {"last_only": True} if last_only else {}

    @torch.inference_mode()
    def run():
        return model(idx, cache=model.new_cache(1), **kwargs)[0][:, -1].argmax(dim=-1)

    return run


def best_times(runs: dict, repeats: int) -> tuple[dict, dict]:
    results = {name: run() for name, run in runs.items()}  # warm-up, and the outputs to compare
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            began = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - began)
    return best, results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", help="a gpt.py whose GPT class to compare against")
    args = parser.parse_args()
    torch.manual_seed(0)
    block = max(args.new_tokens + 1, args.prefill)
    config = model_preset(args.preset, vocab_size=8192, block_size=block)
    model = build_model(config).eval()
    models = {"current": model}
    if args.baseline:
        models["baseline"] = load_baseline(args.baseline)(config).eval()
        models["baseline"].load_state_dict(model.state_dict())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.preset} preset "
        f"(block {block}), onednn packed head available: {_onednn()}",
        file=sys.stderr,
    )
    report = []
    for batch in args.batches:
        runs = {name: decode_loop(m, batch, args.new_tokens) for name, m in models.items()}
        runs["no-packed"] = decode_loop(model, batch, args.new_tokens, use_packed=False)
        best, results = best_times(runs, args.repeats)
        row = {
            "batch": batch,
            **{f"{k}_tokens_per_s": round(batch * args.new_tokens / v, 1) for k, v in best.items()},
        }
        row["same_tokens"] = all(torch.equal(results["current"], r) for r in results.values())
        report.append(row)
        print(json.dumps(row), flush=True)
    runs = {
        "all_logits": prefill(model, args.prefill, False),
        "last_only": prefill(model, args.prefill, True),
    }
    best, results = best_times(runs, args.repeats)
    row = {f"prefill_{k}_tokens_per_s": round(args.prefill / v, 1) for k, v in best.items()}
    row["same_token"] = bool(torch.equal(results["all_logits"], results["last_only"]))
    report.append(row)
    print(json.dumps(row), flush=True)
    return 0 if all(r.get("same_tokens", r.get("same_token")) for r in report) else 1


if __name__ == "__main__":
    sys.exit(main())
