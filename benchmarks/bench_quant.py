"""Quantised runs (GGML blocks kept) against fp32 and int8 runs of the same model, side by side.

For each run folder given, in a fresh process each (so peak memory is that run's alone):
- the run folder's size on disk,
- `load_run` seconds (config, tokenizer, weights: mapped for a quantised run, read for the others),
- prefill seconds for --batch prompts of --prompt-tokens, and decode tokens/s in all at that batch
  (greedy, the decode back-end `aigc generate` steps, --new-tokens steps; best of --repeats), and decode tokens per
  second of the process's CPU time (on a shared machine wall time measures the CPU share the
  scheduler gave; CPU time the work, for one thread; with more, it counts spinning workers too),
- the process's peak resident memory (`ru_maxrss`) after all of it.

    python benchmarks/bench_quant.py RUN [RUN ...] [--threads 1] [--new-tokens 32] [--prompt-tokens 128] [--batch 1]
        [--busy 1]

`--busy N` runs N competing processes (`python -c 'while True: pass'`) while each run is measured,
to see whether the threads of the kernels collapse when another program holds a core.

Make the runs with `aigc import FILE.gguf --out Q` (blocks kept), `aigc import FILE.gguf --dequantize
--out F` (fp32), `aigc export F --format int8|q8_0|q4 --out ...`. Prints a markdown table and a JSON
line per run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
threads, new_tokens, prompt_tokens, repeats, batch = (int(v) for v in sys.argv[2:7])
torch.set_num_threads(threads)
from aigc.models import kinds, load_run
started = time.perf_counter()
run = load_run(sys.argv[1])
load_s = time.perf_counter() - started
model = run.model
prompt = torch.randint(0, 1000, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))
best_prefill, best_decode, best_cpu = float("inf"), float("inf"), float("inf")
with torch.no_grad():
    for _ in range(repeats):
        backend = kinds.decode_backend(model, 0, torch.device("cpu"))  # as `aigc generate` steps
        started = time.perf_counter()
        logits = backend.prefill(prompt.tolist())
        best_prefill = min(best_prefill, time.perf_counter() - started)
        token = logits.argmax(-1, keepdim=True)
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(new_tokens):
            token = backend.step(token, rows=[]).argmax(-1, keepdim=True)
        best_decode = min(best_decode, time.perf_counter() - started)
        best_cpu = min(best_cpu, time.process_time() - cpu_started)
print(json.dumps({"load_s": load_s, "prefill_s": best_prefill, "decode_tok_s": batch * new_tokens / best_decode,
                  "decode_tok_per_cpu_s": batch * new_tokens / best_cpu,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(run: Path, args: argparse.Namespace) -> dict:
    numbers = [str(v) for v in (args.threads, args.new_tokens, args.prompt_tokens, args.repeats, args.batch)]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    try:
        command = [sys.executable, "-c", CHILD, str(run), *numbers]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    config = json.loads((run / "config.json").read_text())
    quantization = config["weights"].get("quantization") or {}
    kinds = sorted(quantization.get("weights_by_type", {})) or [config["weights"]["format"]]
    size = sum(f.stat().st_size for f in run.iterdir() if f.is_file())
    return {"run": str(run), "weights": "+".join(kinds), "folder_mb": size / 1e6, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (tokens/s is their total)")
    parser.add_argument("--busy", type=int, default=0, help="competing busy processes while measuring")
    args = parser.parse_args()
    rows = [measure(run, args) for run in args.runs]
    shape = f"{args.batch} x {args.prompt_tokens}"
    print(
        f"| run | weights | folder MB | load s | prefill {shape} s | decode tok/s, batch {args.batch} | peak RSS MB |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {Path(r['run']).name} | {r['weights']} | {r['folder_mb']:.1f} | {r['load_s']:.2f} | "
            f"{r['prefill_s']:.2f} | {r['decode_tok_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
