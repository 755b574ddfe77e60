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
bash scripts/launch_local.sh ${LAUNCHER[@]+"${LAUNCHER[@]}"} -- \
    lvface/train.py --ds_config configs/zero2.json --config configs/demo.yaml "$@"
python - <<'PY'
import json
summary = json.load(open("demo_out/run/summary.json"))
for name, last in summary["last_accuracy"].items():
    first = summary["first_accuracy"].get(name, float("nan"))
    print(f"verification {name}: accuracy {first:.4f} before training -> {last:.4f} after")
print(f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}; checkpoint {summary['checkpoint']}")
PY
lvface eval verify --checkpoint demo_out/run/checkpoints --bin demo_out/data/val.bin
lvface export --checkpoint demo_out/run/checkpoints --output demo_out/lvface_demo.onnx
