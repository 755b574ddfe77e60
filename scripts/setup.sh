#!/usr/bin/env bash
# Install lvface and everything its demo and tests use into the current Python.
# torch goes first and pinned: an open range would pull a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m pip install -q "torch==2.13.0"
fi
"$PY" -m pip install -q -e ".[all]"
