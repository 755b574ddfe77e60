#!/usr/bin/env bash
# The GPU checks in one call, on an offline node (the device tool's nvidia-h200, or any CUDA machine):
# the CUDA tests (Triton kernels natively), the head benchmark per implementation, a full training step
# of ViT-T and ViT-L with the fused head (images/s, MFU), DALI's GPU decode where DALI is installed,
# apex against torch where apex is installed. Results go to $OUT/gpu_check.json after every stage, the
# log to $OUT/gpu_check.log (default OUT=./gpu_out). Under 8 minutes in all (GPU_CHECK_BUDGET_S=450
# for the stages; see benchmarks/gpu_check.py).
#
# Nothing is downloaded: the node is expected to have Python 3.12 with torch (CUDA), triton, numpy,
# pyyaml, pillow, pyarrow and prometheus-client; DeepSpeed and its pure-Python needs are installed from
# the wheels in .whl/ (benchmarks/fetch_gpu_wheels.sh fills it; carry it with the call) with
# --no-index --no-deps into a private folder; lvface runs from this checkout on PYTHONPATH (lvface/__init__.py
# maps kernels/ to lvface.kernels). DALI's CUDA wheel is too large to carry: without it the check says so.
#
#   bash benchmarks/fetch_gpu_wheels.sh                    # here, once
#   device run: bash benchmarks/gpu_check.sh   carry [".whl"]   timeout_s 540
#   bash benchmarks/gpu_check.sh --dry-run                 # the plumbing on a CPU, tiny sizes (~1 min;
#                                                          # or GPU_CHECK_DRY=1)
#
# Every stage runs in its own process group, killed whole past its budget; the exit status is 1 when a
# stage failed (benchmarks/gpu_check.py).
#
# Record the figures as benchmarks/results/gpu-check-<card>-<date>.md with the card's name (the env stage
# of the JSON), and add its line to the index, benchmarks/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export OUT
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1

SITE=${GPU_CHECK_SITE:-/tmp/lvface_gpu_site}
if python3 -c "import importlib.util as u, sys; sys.exit(u.find_spec('deepspeed') is None)"; then
    echo "[gpu_check] deepspeed already installed: nothing to install"
elif ls .whl/*.whl >/dev/null 2>&1; then
    echo "[gpu_check] installing $(ls .whl/*.whl | wc -l) carried wheels into $SITE (offline)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
        || { echo "[gpu_check] error: installing .whl/*.whl failed"; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "[gpu_check] error: deepspeed is not installed and .whl/ holds no wheels: run" \
         "benchmarks/fetch_gpu_wheels.sh where pip can reach the index and carry .whl with the call"
    exit 1
fi
# this checkout first: `import lvface` (and lvface.kernels) is this tree, never an installed copy;
# the env stage of gpu_check.py records what imports (deepspeed, triton, apex, DALI) and stops early
# with a clear error when deepspeed or triton does not
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# SIGTERM at 480 s reaches gpu_check.py, which kills the running stage's process group before exiting
timeout --kill-after=15 480 python3 benchmarks/gpu_check.py "$@"
status=$?
echo "[gpu_check] done (exit $status); results in $OUT/gpu_check.json"
exit $status
