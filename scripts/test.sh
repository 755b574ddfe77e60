#!/usr/bin/env bash
# Install lvface with its test dependencies, lint it (ruff, configured in pyproject.toml) and run the whole
# suite (CPU only; 10-13 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m ruff check .
python3 -m pytest -q tests "$@"
