#!/bin/sh
# Structured output with the built-in SmolLM2-135M-Instruct (`aigc pull smollm2-135m` first).
# Outputs go to examples/structured/out/; docs/generate.md and docs/serve.md show them.
set -e
cd "$(dirname "$0")"
mkdir -p out
COMMON="--temperature 0.8 --seed 7 --max-new-tokens 400 --overwrite"

# Product descriptions from a CSV of products into a fixed schema, one column per field.
aigc batch smollm2-135m --input products.csv --out out/products.csv $COMMON \
  --system "You are a copywriter for an online shop. Answer in JSON." \
  --template "Describe the product {title}, a {category}, with a title, a tagline and bullets." \
  --json-schema product.schema.json --json-columns

# Reviews classified into {"sentiment": "pos"|"neg", "reason": str}.
aigc batch smollm2-135m --input reviews.csv --out out/reviews.csv $COMMON \
  --system "You classify customer reviews. Answer in JSON." \
  --template "Review: {review}
Is it positive (pos) or negative (neg), and why?" \
  --json-schema review.schema.json --json-columns

# A customer-service turn with a tool call, through the HTTP API.
aigc serve smollm2-135m --port 8765 > "${TMPDIR:-/tmp}/aigc-structured-serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf http://127.0.0.1:8765/health > /dev/null; do sleep 1; done
python support.py --base-url http://127.0.0.1:8765/v1 | tee out/support.txt
