"""Structured output on the built-in base (SmolLM2-135M-Instruct): validity, overhead, compile time.

1. Validity: `--objects` JSON objects at temperature 0.8 across the three examples of
   examples/structured (product descriptions, review classification, lookup_order tool calls), in
   batches of `--batch`; every one must parse and validate against its schema (`jsonschema`), or be
   reported as cut short by the token limit.
2. Overhead: tokens/s of the same requests with and without a grammar, at batch 1 and 16. Both decode
   exactly `--steps` tokens (end-of-text suppressed; the grammar is a string too long to finish), so
   the difference is the mask: llguidance's per-row computation plus applying it to the logits.
3. Compile: the first grammar for each schema (checked, then compiled for the tokenizer) and the cached
   second one.

    AIGC_HOME=/tmp/aigc_home python benchmarks/bench_json.py [--objects 102] [--batch 17] [--steps 32]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path

import jsonschema
import torch

from aigc.chat import Message, encode_chat, load_chat_template
from aigc.config import SampleConfig
from aigc.generate import Request, generate
from aigc.models import load_run
from aigc.sampling import apply_allowed
from aigc.structured import GrammarState, allowed_tokens, json_grammar
from aigc.tools import call_schema, fallback_messages, parse_tools, tool_grammar

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "structured"


def tasks(run, template):
    """(name, schema, grammar, prompt) for each of the three examples' inputs."""
    product = json.loads((EXAMPLES / "product.schema.json").read_text())
    review = json.loads((EXAMPLES / "review.schema.json").read_text())
    spec = __import__("importlib").util.spec_from_file_location("support", EXAMPLES / "support.py")
    support = __import__("importlib").util.module_from_spec(spec)
    spec.loader.exec_module(support)
    tools = parse_tools(support.TOOLS)

    def chat(system, user, with_tools=()):
        messages = fallback_messages([Message("system", system), Message("user", user)], with_tools)
        return encode_chat(template, run.tokenizer, messages, context=2048)

    out = []
    with open(EXAMPLES / "products.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            prompt = chat(
                "You are a copywriter for an online shop. Answer in JSON.",
                f"Describe the product {row['title']}, a {row['category']}, with a title, a tagline and bullets.",
            )
            out.append(("product", product, json_grammar(product, "product"), prompt))
    with open(EXAMPLES / "reviews.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            prompt = chat(
                "You classify customer reviews. Answer in JSON.",
                f"Review: {row['review']}\nIs it positive (pos) or negative (neg), and why?",
            )
            out.append(("review", review, json_grammar(review, "review"), prompt))
    for order in ("AB123", "XY908", "QK311"):
        prompt = chat("You are a customer-service agent.", f"Where is my order {order}?", tools)
        out.append(("tool call", call_schema(tools), tool_grammar(tools, "required"), prompt))
    return out


def validity(run, template, objects: int, batch: int) -> dict:
    work = tasks(run, template)
    counts = {name: [0, 0, 0] for name, *_ in work}  # valid, cut short, invalid
    jobs = [(work[i % len(work)], i) for i in range(objects)]
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        requests = [
            Request(prompt_ids=p.ids, stop_ids=p.stop_ids, grammar=g, config=SampleConfig(max_new_tokens=400, seed=i))
            for (_, _, g, p), i in chunk
        ]
        for ((name, schema, _, _), _), c in zip(chunk, generate(run.model, run.tokenizer, requests)):
            if not c.complete:
                counts[name][1] += 1
                continue
            try:
                jsonschema.validate(json.loads(c.text), schema)
                counts[name][0] += 1
            except (json.JSONDecodeError, jsonschema.ValidationError):
                counts[name][2] += 1
    return counts


def overhead(run, steps: int, batch: int, pairs: int) -> tuple[float, float, float]:
    """tokens/s (unconstrained, constrained: medians) and the median of each back-to-back pair's slowdown,
    for `batch` rows decoding exactly `steps` tokens. Pairs alternate which side runs first, so a busy
    spell on a shared CPU hits both alike; the per-pair ratio cancels slow drifts."""
    grammar = json_grammar({"type": "object", "properties": {"text": {"type": "string", "minLength": 4 * steps}}})
    config = SampleConfig(max_new_tokens=steps, min_new_tokens=steps, temperature=0.8, seed=1)

    def rate(g) -> float:
        requests = [Request(prompt="Write JSON:", config=config, grammar=g) for _ in range(batch)]
        started = time.perf_counter()
        done = generate(run.model, run.tokenizer, requests)
        return sum(len(c.token_ids) for c in done) / (time.perf_counter() - started)

    free, constrained = [], []
    for p in range(pairs):
        order = (None, grammar) if p % 2 == 0 else (grammar, None)
        for g in order:
            (free if g is None else constrained).append(rate(g))
    slowdowns = sorted(1 - c / f for f, c in zip(free, constrained))
    return statistics.median(free), statistics.median(constrained), slowdowns[len(slowdowns) // 2]


def mask_cost(run, batch: int, walks: int = 5) -> float:
    """Milliseconds per decode step that the grammar adds for `batch` rows (median of `walks` walks):
    computing each row's mask, applying it to (B, V) logits and advancing each row's grammar, along a
    valid product object (the model is not involved)."""
    schema = json.loads((EXAMPLES / "product.schema.json").read_text())
    text = json.dumps({"title": "Aurora", "tagline": "Light that follows you", "bullets": ["warm", "dimmable"]})
    grammar = json_grammar(schema, "product")
    ids = run.tokenizer.encode(text)
    vocab = run.model.config.vocab_size
    logits = torch.randn(batch, vocab)
    times = []
    for _ in range(walks):
        states = [GrammarState(run.tokenizer, grammar) for _ in range(batch)]
        started = time.perf_counter()
        for token in ids:
            apply_allowed(logits, allowed_tokens(states, vocab))
            for state in states:
                state.advance(token)
        times.append((time.perf_counter() - started) * 1e3 / len(ids))
    return statistics.median(times)


def compile_times(run) -> dict:
    out = {}
    for path in sorted(EXAMPLES.glob("*.schema.json")):
        schema = json.loads(path.read_text())
        schema["$comment"] = f"fresh {time.time()}"  # a new text: no cache can hold it yet
        started = time.perf_counter()
        GrammarState(run.tokenizer, json_grammar(schema, path.name))
        first = time.perf_counter() - started
        started = time.perf_counter()
        GrammarState(run.tokenizer, json_grammar(schema, path.name))
        out[path.name] = (first * 1e3, (time.perf_counter() - started) * 1e3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="smollm2-135m")
    parser.add_argument("--objects", type=int, default=102)
    parser.add_argument("--batch", type=int, default=17)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=5, help="back-to-back free/constrained runs per batch size")
    parser.add_argument("--skip-validity", action="store_true")
    args = parser.parse_args()
    run = load_run(args.run)
    template = load_chat_template(run.path)
    GrammarState(run.tokenizer, json_grammar(None))  # llguidance's view of the tokenizer, built once (~1 s)
    print(f"torch threads {torch.get_num_threads()}; grammar compile (first, cached) in ms:")
    for name, (first, cached) in compile_times(run).items():
        print(f"  {name}: {first:.2f}, {cached:.3f}")
    for batch in (1, 16):
        print(f"batch {batch}: the mask adds {mask_cost(run, batch):.2f} ms per decode step")
    for batch in (1, 16):
        free, constrained, slowdown = overhead(run, args.steps, batch, args.pairs)
        print(
            f"batch {batch}: {free:.1f} tokens/s free, {constrained:.1f} constrained (medians of {args.pairs}); "
            f"median pair slowdown {100 * slowdown:+.1f} %"
        )
    if args.skip_validity:
        return
    started = time.perf_counter()
    counts = validity(run, template, args.objects, args.batch)
    print(f"validity at temperature 0.8 ({time.perf_counter() - started:.0f} s): valid / cut short / invalid")
    for name, (valid, short, invalid) in counts.items():
        print(f"  {name}: {valid} / {short} / {invalid}")


if __name__ == "__main__":
    main()
