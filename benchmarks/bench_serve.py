"""Load and abuse test of `aigc serve` on loopback: throughput and latency, then a schema fuzz pass.

Starts the real command (`python -m aigc serve RUN`) on a free 127.0.0.1 port, then in one run:
1. load: N concurrent clients, each sending R non-streaming completions one after another (every
   request makes exactly --max-tokens tokens: min_tokens = max_tokens), for each N in --clients.
   Reports errors, tokens/s, requests/s and p50/p99 latency, and each N's throughput relative to 1 client.
2. fuzz: schemathesis generates requests from the server's /openapi.json (valid and invalid data,
   random types, huge numbers, odd Unicode) and checks that no answer is a 5xx and every answer
   matches the documented status codes, content types and response schemas.
3. shutdown: Ctrl+C (SIGINT) must stop the server cleanly, and its log must hold no traceback.

Without --run it serves a randomly initialised model of the `small` preset (vocabulary 8192, a BPE
tokenizer trained on the Python standard library's sources): decoding costs the same as a trained one.

    python benchmarks/bench_serve.py [--run RUN] [--clients 1 16 32] [--requests 20] [--max-tokens 64]
                                     [--fuzz-examples 100] [--no-fuzz]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

FUZZ_CHECKS = (
    "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
    "response_headers_conformance,negative_data_rejection,unsupported_method"
)


def random_run(folder: Path, preset: str) -> Path:
    """A run folder with random weights of `preset` and a real 8192-token BPE vocabulary."""
    import torch

    from aigc.artifacts.run import RunConfig, save_run
    from aigc.config import model_preset
    from aigc.models import build_model
    from aigc.tokenizer import Tokenizer

    files = sorted(Path(json.__file__).parent.parent.glob("*.py"))
    texts = (path.read_text(encoding="utf-8", errors="replace") for path in files)
    tokenizer = Tokenizer.train(texts, vocab_size=8192, labels=("pos", "neg"))
    torch.manual_seed(0)
    config = model_preset(preset, vocab_size=tokenizer.vocab_size)
    data = {"source": f"random {preset} weights (benchmark)", "labels": ["pos", "neg"]}
    return save_run(folder / "bench", RunConfig(model=config, data=data), tokenizer, build_model(config))


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(run: Path, port: int, log: Path, max_batch: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "aigc",
        "serve",
        str(run),
        "--port",
        str(port),
        "--max-batch",
        str(max_batch),
        "--max-queue",
        "4096",
        "--max-tokens-limit",
        "128",
    ]
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited early; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("server did not come up within 120 s")


def client_loop(url: str, model: str, client_id: int, requests: int, max_tokens: int, out: list) -> None:
    """One client: `requests` completions in a row; appends (latency_s, tokens, error) per request."""
    with httpx.Client(timeout=600) as http:
        for i in range(requests):
            body = {
                "model": model,
                "prompt": f"Review {client_id}-{i}: the film",
                "max_tokens": max_tokens,
                "min_tokens": max_tokens,
                "temperature": 0.8,
                "seed": client_id * 1000 + i,
            }
            started = time.perf_counter()
            try:
                response = http.post(f"{url}/v1/completions", json=body)
                ok = response.status_code == 200
                tokens = response.json()["usage"]["completion_tokens"] if ok else 0
                error = None if ok else f"HTTP {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                tokens, error = 0, f"{type(exc).__name__}: {exc}"
            out.append((time.perf_counter() - started, tokens, error))


def load(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    before = httpx.get(f"{url}/health").json()
    results: list = []
    threads = [
        threading.Thread(target=client_loop, args=(url, model, c, requests, max_tokens, results))
        for c in range(clients)
    ]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    after = httpx.get(f"{url}/health").json()
    latencies = sorted(r[0] for r in results)
    errors = [r[2] for r in results if r[2]]
    return {
        "clients": clients,
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": sum(r[1] for r in results),
        "wall_s": wall,
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "requests_per_s": len(results) / wall,
        "p50_s": statistics.median(latencies),
        "p99_s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
        "mean_batch": (after["sequences"] - before["sequences"]) / max(1, after["batches"] - before["batches"]),
    }


def fuzz(url: str, examples: int, report: Path) -> tuple[int, str]:
    """Run schemathesis against the live server; returns its exit code and the summary lines."""
    binary = Path(sys.executable).parent / "schemathesis"
    command = [
        str(binary if binary.exists() else shutil.which("schemathesis") or "schemathesis"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        FUZZ_CHECKS,
        "--max-examples",
        str(examples),
        "--seed",
        "1",
        "--generation-database",
        "none",
        "--no-color",
        "--workers",
        "1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(done.stdout + done.stderr, encoding="utf-8")
    lines = [line for line in done.stdout.splitlines() if "generated" in line or "issues" in line or "failure" in line]
    return done.returncode, "\n".join(lines[-3:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="serve this run instead of a random `small` one")
    parser.add_argument("--preset", default="small", help="model preset of the random run")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--max-batch", type=int, default=32, help="the server's --max-batch")
    parser.add_argument("--fuzz-examples", type=int, default=100, help="schemathesis examples per operation")
    parser.add_argument("--no-fuzz", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        run = args.run or random_run(tmp, args.preset)
        port, log = free_port(), tmp / "server.log"
        server = start_server(run, port, log, args.max_batch)
        url = f"http://127.0.0.1:{port}"
        try:
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            summary = httpx.get(f"{url}/v1/run").json()
            print(
                f"serving {summary['kind']} {summary['params']:,} params, context {summary['block_size']}, "
                f"vocab {summary['vocab_size']}; --max-batch {args.max_batch}; {args.max_tokens} tokens/request",
                file=sys.stderr,
            )
            load(url, model, 2, 2, 4)  # warm-up: first-call allocations, thread pools
            rows = [load(url, model, n, args.requests, args.max_tokens) for n in args.clients]
            fuzz_result = None if args.no_fuzz else fuzz(url, args.fuzz_examples, Path("test-artifacts/fuzz.txt"))
            healthy = httpx.get(f"{url}/health").json()["status"] == "ok"
        finally:
            server.send_signal(signal.SIGINT)
            code = server.wait(120)
        server_log = log.read_text(encoding="utf-8")

    report(rows, fuzz_result, healthy, code, server_log)
    failed = any(r["errors"] for r in rows) or not healthy or code != 0 or "Traceback" in server_log
    return 1 if failed or (fuzz_result and fuzz_result[0] != 0) else 0


def report(rows: list[dict], fuzz_result, healthy: bool, code: int, server_log: str) -> None:
    base = next((r["tokens_per_s"] for r in rows if r["clients"] == 1), rows[0]["tokens_per_s"])
    print(
        "| clients | requests | errors | tokens/s | vs 1 client | requests/s | p50 latency | p99 latency | mean batch |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / base:.1f}x | {r['requests_per_s']:.1f} | {r['p50_s']:.2f} s | {r['p99_s']:.2f} s | "
            f"{r['mean_batch']:.1f} |"
        )
        if r["first_error"]:
            print(f"  first error: {r['first_error']}")
    if fuzz_result:
        status = "no failures" if fuzz_result[0] == 0 else f"FAILED (exit {fuzz_result[0]})"
        print(f"fuzz (schemathesis, full log in test-artifacts/fuzz.txt): {status}\n{fuzz_result[1]}")
    server_errors = server_log.count(" 500 Internal Server Error")
    print(
        f"server after the run: healthy={healthy}; SIGINT exit code {code}; 500s in its log: {server_errors}; "
        f"tracebacks: {server_log.count('Traceback')}"
    )
    print(json.dumps({"load": rows}))


if __name__ == "__main__":
    sys.exit(main())
