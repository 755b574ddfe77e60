#!/usr/bin/env bash
# Install lvface with its test dependencies, lint it (ruff, configured in pyproject.toml) and run the whole
# suite (CPU only; 10-13 minutes on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# tests/test_slurm_real.py runs launch/slurm_64gpu.sh under a real single-node SLURM: its packages come
# from the distribution where apt-get can install them (as root; LVFACE_NO_APT=1 skips this). Without
# them that test is skipped and says why.
if [ -z "${LVFACE_NO_APT:-}" ] && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1 \
        && ! { command -v slurmctld && command -v munged; } >/dev/null 2>&1; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } >/dev/null 2>&1 \
        || echo "scripts/test.sh: apt-get could not install slurm-wlm and munge: tests/test_slurm_real.py is skipped" >&2
fi
python3 -m ruff check .
python3 -m pytest -q tests "$@"
