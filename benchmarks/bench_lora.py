"""LoRA training speed on the CPU: aigc against `peft` + `transformers` on the same weights.

Both sides train LoRA r16 (alpha 32) on every linear layer of every block of SmolLM2-135M (ours: the
fused c_attn, c_proj, c_fc; theirs: q/k/v/o/gate/up/down_proj), batch 4 x 128 tokens, AdamW over the
adapters, full forward + backward + step. The transformers model is a `LlamaForCausalLM` built from our
weights (interop.llama), so both start from identical numbers. Variants run interleaved, round after
round (a busy spell on a shared machine hits all alike); each reports its best round.

    AIGC_HOME=/tmp/aigc_home python benchmarks/bench_lora.py [--rounds 3] [--steps 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch

from aigc.artifacts.device import cpu_has_fast_bf16
from aigc.models import load_run
from aigc.models.lora import LoRASpec, apply_lora

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = sorted(set(re.findall(r"\b(avx2|avx512[a-z_0-9]*|amx[a-z_0-9]*)\b", text)))
    return f"{model.group(1) if model else platform.processor()}; {' '.join(flags)}"


def ours(run, rank: int):
    model = load_run(run).model
    apply_lora(model, LoRASpec(rank=rank, alpha=2.0 * rank, targets=("c_attn", "c_proj", "c_fc")))
    return model.train(), lambda m, x: m(x[:, :-1], x[:, 1:])[1]


def theirs(run, rank: int):
    # Deferred: transformers and peft are benchmark-only dependencies (the `hf` extra).
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from aigc.interop.llama import hf_config_from, state_dict_to_hf

    loaded = load_run(run)
    config = loaded.config.model
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_from(config)))
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(loaded.model.state_dict(), config), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    hf.tie_weights()
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=HF_TARGETS)
    model = get_peft_model(hf, lora).train()
    return model, lambda m, x: m(input_ids=x, labels=x, use_cache=False).loss


def trainer(model, loss_fn, dtype: str):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step(x):
        with autocast:
            loss = loss_fn(model, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="smollm2-135m", help="a run folder or pulled model name")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence (the model sees seq of them)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--dtypes", nargs="+", default=None, help="fp32 and/or bf16 (default: bf16 too if fast)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    dtypes = args.dtypes or (["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"])
    torch.manual_seed(0)
    vocab = load_run(args.run).config.model.vocab_size
    x = torch.randint(0, vocab, (args.batch, args.seq + 1))  # (B, T + 1): inputs and shifted targets
    builders = {"aigc": ours, "peft": theirs}
    models = {name: build(args.run, args.rank) for name, build in builders.items()}
    steps = {f"{n} {d}": trainer(*models[n], d) for n in builders for d in dtypes}
    best = dict.fromkeys(steps, float("inf"))
    for step in steps.values():  # warm-up: first-call allocations, oneDNN kernel choice
        step(x)
    for _ in range(args.rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(args.steps):
                step(x)
            best[name] = min(best[name], (time.perf_counter() - started) / args.steps)
    tokens = args.batch * args.seq
    rates = {name: tokens / seconds for name, seconds in best.items()}
    print(f"host: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"LoRA r{args.rank} on all block linears, batch {args.batch} x {args.seq}, best of {args.rounds} rounds")
    for name, rate in rates.items():
        print(f"  {name:10s} {rate:8.1f} tokens/s  ({best[name]:.2f} s/step)")
    for d in dtypes:
        print(f"  ratio aigc/peft at {d}: {rates[f'aigc {d}'] / rates[f'peft {d}']:.2f}x")
    print(f"  ratio aigc best / peft fp32: {max(rates[f'aigc {d}'] for d in dtypes) / rates['peft fp32']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": cpu_flags(), "tokens_per_s": rates}, indent=1))


if __name__ == "__main__":
    main()
