#!/bin/sh
# The three business tasks with the built-in SmolLM2-135M-Instruct (`aigc pull smollm2-135m` first).
# Outputs go to examples/chat/out/; docs/chat.md shows them and the instruction-following rates.
set -e
cd "$(dirname "$0")"
mkdir -p out
COMMON="--max-new-tokens 80 --temperature 0.3 --seed 7 --overwrite"

aigc batch smollm2-135m --input products.csv --out out/products.jsonl $COMMON \
  --system "You are a copywriter for an online shop." \
  --template "Write a two-sentence product description for {title}, a {category}."
python check.py out/products.jsonl --name-field title --max-sentences 2

aigc batch smollm2-135m --input marketing.csv --out out/marketing.jsonl $COMMON \
  --system "You write short, catchy marketing lines." \
  --template "Write one marketing line of at most 15 words for {product}, aimed at {audience}."
python check.py out/marketing.jsonl --name-field product --max-sentences 1 --max-words 15

aigc batch smollm2-135m --input support.csv --out out/support.jsonl $COMMON \
  --system "You are a polite customer-service agent for an online shop. Answer in at most three sentences." \
  --template "A customer writes about their {product}: \"{question}\" Write the reply."
python check.py out/support.jsonl --name-field product --max-sentences 3
