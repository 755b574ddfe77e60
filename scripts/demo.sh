#!/usr/bin/env bash
# The demo, end to end on this machine: install, synthetic identities as RecordIO, 2-rank DeepSpeed
# ZeRO-2 training with verification, evaluation of the checkpoint, ONNX export with parity checks.
#   bash scripts/demo.sh [launcher options --] [config overrides]
#   bash scripts/demo.sh train.epochs=1                      # overrides go to lvface/train.py
#   bash scripts/demo.sh --master_port 29700 -- train.epochs=1
#   bash scripts/demo.sh --include localhost:0 --
# Options before `--` go to DeepSpeed's launcher (scripts/launch_local.sh); without them it runs RANKS
# (default 2) ranks on a free master port, so a busy 29500 does not stop it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
LAUNCHER=()
if printf '%s\n' "$@" | grep -qx -- '--'; then
    while [ "$1" != "--" ]; do LAUNCHER+=("$1"); shift; done
    shift
fi
# Without a GPU, DeepSpeed warns in each of its processes that it found none: say it once here instead.
if ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    export DS_ACCELERATOR=cpu
    echo "demo: no CUDA device: ${RANKS:-2} ranks on the CPU (gloo)"
fi

# A new demo is a fresh run: an earlier demo's folder (finished, or killed without a lock left behind) is
# kept under a dated name rather than overwritten; lvface refuses a fresh run in a folder holding another
# run's checkpoints, and a live run's folder (it holds .lvface.lock, see lvface/run_folder.py) is left to
# lvface's lock to report.
if [ -d demo_out/run ] && [ ! -e demo_out/run/.lvface.lock ]; then
    previous="demo_out/run.$(date +%Y%m%d-%H%M%S)"
    mv demo_out/run "$previous"
    echo "demo: the previous demo run is kept in $previous"
fi
lvface synth --out demo_out/data --identities 300 --images-per-identity 20 --val-identities 100 --val-pairs 600
# --log_level error: the launcher's own bookkeeping (commands, world info, pids) stays out of the log;
# its errors (a rank's exit code) still show. The run ends with its summary (and summary.json).
bash scripts/launch_local.sh --log_level error ${LAUNCHER[@]+"${LAUNCHER[@]}"} -- \
    lvface/train.py --ds_config configs/zero2.json --config configs/demo.yaml "$@"
lvface eval verify --checkpoint demo_out/run/checkpoints --bin demo_out/data/val.bin
lvface export --checkpoint demo_out/run/checkpoints --output demo_out/lvface_demo.onnx
