#!/usr/bin/env bash
# Reproduce the published benchmark tables (docs/benchmarks.md) on this machine:
#   bash benchmarks/run.sh            # 3 questions per category (the published run)
#   LIMIT= bash benchmarks/run.sh     # the whole prompt set
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT-3}
METHODS="ngram hf:prompt_lookup:3 hf:prompt_lookup:5 hf:prompt_lookup:10"
for model in smollm2-135m gemma3-270m; do
  specplug bench --model "$model" --methods "$METHODS" --prompts benchmarks/prompts.jsonl \
    ${LIMIT:+--limit "$LIMIT"} --max-new-tokens 128 --out "benchmarks/results/$model"
done
