#!/usr/bin/env bash
# LVFace on 64 GPUs (8 nodes x 8) under SLURM: one task per GPU, ranks from SLURM's environment
# (lvface/distributed.py maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the first node of
# SLURM_JOB_NODELIST to torch.distributed's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR).
#
#   sbatch launch/slurm_64gpu.sh                                    # ViT-L on WebFace42M
#   CONFIG=configs/lvface_vit_t_wf42m.yaml sbatch launch/slurm_64gpu.sh data.rec=/scratch/wf42m/train.rec
#   LVFACE_DRY_RUN=1 SLURM_JOB_NODELIST='gpu[01-08]' SLURM_NTASKS_PER_NODE=8 bash launch/slurm_64gpu.sh
#       # prints the command every node runs and its ranks, runs nothing (also: --dry-run as first argument)
#
# Submit from the repository root: the job runs there, and its log is lvface-<jobid>.out in it (slurmd
# opens the --output file before this script runs, so it must not name a folder that may not exist).
#
# NCCL over InfiniBand: see launch/README.md (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, ...); set them here or in
# the cluster's environment module.
#
#SBATCH --job-name=lvface
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=7-00:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# Preemption: SLURM sends SIGUSR1 to every task 10 minutes before the time limit (SIGTERM on a
# preemption; `scancel --signal=USR1 --full` sends it to this shell too, which passes it on); every rank
# saves at the next step boundary and exits 75 (EX_TEMPFAIL), rank 0 leaves a PREEMPTED marker in the
# output folder, and this script requeues the job, which resumes from that checkpoint
# (checkpoint.resume: auto). srun does not kill the other ranks when the first exits 75
# (--kill-on-bad-exit=0): they get LVFACE_SRUN_WAIT seconds (--wait) to finish their own exit, which
# also bounds how long the others live on after a rank crashes.
#SBATCH --signal=USR1@600
set -euo pipefail
DRY_RUN=${LVFACE_DRY_RUN:-}
[ "${1:-}" = "--dry-run" ] && { DRY_RUN=1; shift; }

CONFIG=${CONFIG:-configs/lvface_vit_l_wf42m.yaml}
DS_CONFIG=${DS_CONFIG:-configs/zero2.json}
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation: submit with sbatch, or set SLURM_JOB_NODELIST (and LVFACE_DRY_RUN=1) to preview}"
# scontrol expands "gpu[01-08,10],login1"; where it is missing or has no configuration (a laptop, a
# login node without slurm.conf: a dry run), the same expansion in Python
if ! NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null)) || [ ${#NODES[@]} -eq 0 ]; then
    NODES=($(python3 - "$SLURM_JOB_NODELIST" <<'PY'
import re, sys
out = []
for prefix, ranges in re.findall(r"([^,\[]+)(?:\[([^\]]+)\])?", sys.argv[1]):
    for part in ranges.split(",") if ranges else [""]:
        lo, _, hi = part.partition("-")
        out += [f"{prefix}{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1)] if lo else [prefix]
print(" ".join(out))
PY
))
fi
TASKS_PER_NODE=${SLURM_NTASKS_PER_NODE:-8}
export MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR=${NODES[0]}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # collectives time out after train.collective_timeout_s
CMD=(python -u lvface/train.py --ds_config "$DS_CONFIG" --config "$CONFIG" "$@")
SRUN=(srun --kill-on-bad-exit=0 --wait="${LVFACE_SRUN_WAIT:-120}" --cpu-bind=none)

if [ -n "$DRY_RUN" ]; then
    WORLD=$(( ${#NODES[@]} * TASKS_PER_NODE ))
    echo "# SLURM: ${#NODES[@]} nodes x $TASKS_PER_NODE tasks = $WORLD ranks; MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    echo "# ${SRUN[*]} starts on every node, once per task:"
    for i in "${!NODES[@]}"; do
        first=$(( i * TASKS_PER_NODE )); last=$(( first + TASKS_PER_NODE - 1 ))
        echo "[${NODES[$i]}] SLURM_NODEID=$i SLURM_PROCID=$first..$last SLURM_LOCALID=0..$(( TASKS_PER_NODE - 1 )) SLURM_NTASKS=$WORLD MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS ${CMD[*]}"
    done
    exit 0
fi
# The output folder (train.output_dir of the config and its overrides), where rank 0 writes the
# PREEMPTED marker after a preemption save: the marker, not srun's code alone, says "requeue" (a rank
# that srun stops after the save changes the code, not the checkpoint). An earlier start's is removed.
OUT=$(python3 -c 'import sys; from lvface.config import load_config
print(load_config(sys.argv[1], [a for a in sys.argv[2:] if "=" in a and not a.startswith("-")]).train.output_dir)' \
    "$CONFIG" "$@")
MARKER="$OUT/PREEMPTED"
rm -f "$MARKER"
# Resume is automatic (checkpoint.resume: auto in the WebFace42M configs), so a requeued job continues;
# the head's shards are re-split if the job comes back with a different GPU count.
# A stop signal to this shell (scancel --full, a preemption's SIGTERM) would end it and the job with
# it: it is trapped and passed on to srun, which forwards it to every task. `wait` returns early when
# a trapped signal arrives, so the loop waits again until srun itself has exited.
received=
pass_on() { received=$1; [ -n "${SRUN_PID:-}" ] && kill -s "$1" "$SRUN_PID" 2>/dev/null || true; }
trap 'pass_on USR1' USR1
trap 'pass_on TERM' TERM
"${SRUN[@]}" "${CMD[@]}" &
SRUN_PID=$!
while :; do
    received=
    status=0
    wait "$SRUN_PID" || status=$?
    [ -n "$received" ] || break
done
if [ "$status" -ne 0 ] && { [ "$status" -eq 75 ] || [ -f "$MARKER" ]; }; then
    echo "lvface saved a preemption checkpoint (srun exit $status, $MARKER: $(cat "$MARKER" 2>/dev/null)): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
