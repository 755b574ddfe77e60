#!/usr/bin/env bash
# LVFace on 64 GPUs (8 nodes x 8) under SLURM: one task per GPU, ranks from SLURM's environment
# (lvface/distributed.py maps SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and the first node of
# SLURM_JOB_NODELIST to torch.distributed's RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR).
#
#   sbatch launch/slurm_64gpu.sh                                    # ViT-L on WebFace42M
#   CONFIG=configs/lvface_vit_t_wf42m.yaml sbatch launch/slurm_64gpu.sh data.rec=/scratch/wf42m/train.rec
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

CONFIG=${CONFIG:-configs/lvface_vit_l_wf42m.yaml}
DS_CONFIG=${DS_CONFIG:-configs/zero2.json}
export MASTER_PORT=${MASTER_PORT:-29500}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # collectives time out after train.collective_timeout_s
mkdir -p logs

# Resume is automatic (checkpoint.resume: auto in the WebFace42M configs), so a requeued job continues;
# the head's shards are re-split if the job comes back with a different GPU count.
status=0
srun --kill-on-bad-exit=1 --cpu-bind=none \
    python -u lvface/train.py --ds_config "$DS_CONFIG" --config "$CONFIG" "$@" || status=$?
if [ "$status" -eq 75 ]; then
    echo "lvface saved a preemption checkpoint (exit 75): requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
exit "$status"
