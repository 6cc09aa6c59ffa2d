#!/usr/bin/env bash
# Reproduce the published benchmark tables (docs/benchmarks.md) on this machine:
#   bash benchmarks/run.sh            # 3 questions per category (the published run)
#   LIMIT= bash benchmarks/run.sh     # the whole prompt set
set -euo pipefail
# the short-answer categories, no_copy included (long_generation is docs/adaptive.md's, 2,048 tokens)
CATEGORIES="code_editing long_form_writing math_reasoning multi_turn no_copy qa rag summarization translation"
cd "$(dirname "$0")/.."
LIMIT=${LIMIT-3}
METHODS="ngram hf:prompt_lookup:3 hf:prompt_lookup:5 hf:prompt_lookup:10"
for model in smollm2-135m gemma3-270m; do
  specplug bench --model "$model" --methods "$METHODS" --prompts benchmarks/prompts.jsonl --categories $CATEGORIES \
    ${LIMIT:+--limit "$LIMIT"} --max-new-tokens 128 --out "benchmarks/results/$model"
done
