#!/usr/bin/env bash
# Benchmark the trained heads against greedy and ngram (docs/drafters.md, "Measured"):
#   bash benchmarks/run_heads.sh
# The shipped heads are used as they are; EXTRA adds more methods, for example heads trained
# by scripts/train_heads.sh: EXTRA="medusa:checkpoint=heads-work/smollm2-135m-medusa".
set -euo pipefail
# the eight short-answer categories (long_generation is docs/adaptive.md's, 2,048 tokens)
CATEGORIES="code_editing long_form_writing math_reasoning multi_turn no_copy qa rag summarization translation"
cd "$(dirname "$0")/.."
LIMIT=${LIMIT-3}
MODELS=${MODELS:-"smollm2-135m gemma3-270m"}
for model in $MODELS; do
  specplug bench --model "$model" --methods "ngram eagle clover ${EXTRA:-}" \
    --prompts benchmarks/prompts.jsonl --categories $CATEGORIES ${LIMIT:+--limit "$LIMIT"} --max-new-tokens 128 \
    --out "benchmarks/results/$model-heads"
done
