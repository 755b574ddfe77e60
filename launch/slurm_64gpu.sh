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
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
# Preemption: SLURM sends SIGUSR1 to every task 10 minutes before the time limit (and SIGTERM on a
# preemption); lvface saves at the next step boundary and exits 75 (EX_TEMPFAIL), and this script
# requeues the job, which resumes from that checkpoint (checkpoint.resume: auto).
#SBATCH --signal=USR1@600
set -euo pipefail
DRY_RUN=${LVFACE_DRY_RUN:-}
[ "${1:-}" = "--dry-run" ] && { DRY_RUN=1; shift; }

CONFIG=${CONFIG:-configs/lvface_vit_l_wf42m.yaml}
DS_CONFIG=${DS_CONFIG:-configs/zero2.json}
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation: submit with sbatch, or set SLURM_JOB_NODELIST (and LVFACE_DRY_RUN=1) to preview}"
if command -v scontrol >/dev/null 2>&1; then
    NODES=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))
else  # no SLURM tools (a dry run on a laptop): expand "gpu[01-08,10],login1" ourselves
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

if [ -n "$DRY_RUN" ]; then
    WORLD=$(( ${#NODES[@]} * TASKS_PER_NODE ))
    echo "# SLURM: ${#NODES[@]} nodes x $TASKS_PER_NODE tasks = $WORLD ranks; MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    echo "# srun --kill-on-bad-exit=1 --cpu-bind=none starts on every node, once per task:"
    for i in "${!NODES[@]}"; do
        first=$(( i * TASKS_PER_NODE )); last=$(( first + TASKS_PER_NODE - 1 ))
        echo "[${NODES[$i]}] SLURM_NODEID=$i SLURM_PROCID=$first..$last SLURM_LOCALID=0..$(( TASKS_PER_NODE - 1 )) SLURM_NTASKS=$WORLD MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT OMP_NUM_THREADS=$OMP_NUM_THREADS ${CMD[*]}"
    done
    exit 0
fi
mkdir -p logs
# Resume is automatic (checkpoint.resume: auto in the WebFace42M configs), so a requeued job continues;
# the head's shards are re-split if the job comes back with a different GPU count.
status=0
srun --kill-on-bad-exit=1 --cpu-bind=none "${CMD[@]}" || status=$?
if [ "$status" -eq 75 ]; then
    echo "lvface saved a preemption checkpoint (exit 75): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
