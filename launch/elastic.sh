#!/usr/bin/env bash
# LVFace under torchrun's elastic mode: start this on every node; when a node is lost, the job goes on
# with the nodes that are left.
#   RDZV_ENDPOINT=node01:29400 NNODES=4:8 launch/elastic.sh --config configs/lvface_vit_l_wf42m.yaml
#   launch/elastic.sh --dry-run --config configs/lvface_vit_l_wf42m.yaml      # prints the command; runs nothing
# Settings (environment): NNODES MIN:MAX nodes (1:8), NPROC_PER_NODE (the GPUs, or 1 without any),
# RDZV_ENDPOINT host:port of the rendezvous (127.0.0.1:29400), RDZV_ID the job's id (lvface),
# MAX_RESTARTS (3), RDZV_CONF extra rendezvous settings ("is_host=1,last_call_timeout=30"), DS_CONFIG,
# PYTHON. LVFACE_DRY_RUN=1 is --dry-run. Arguments go to lvface.train.
#
# How a lost node heals: its peers' collectives fail (a closed connection at once, a silent node after
# train.collective_timeout_s), their workers exit, and each surviving torchrun agent restarts its
# workers (at most MAX_RESTARTS times) into a new rendezvous of the nodes still alive, at least MIN of
# them, after the rendezvous' last call (last_call_timeout, 30 s by default). The new workers resume
# from the run's latest checkpoint (checkpoint.resume=auto, set here) on the new world size: the head
# is re-split and the schedule continues from the samples seen. Steps after that checkpoint are lost,
# so checkpoint.every_steps bounds the loss. The c10d rendezvous store lives in the torchrun agent on
# the RDZV_ENDPOINT host: losing that node ends the job (an etcd rendezvous avoids that).
set -euo pipefail
DRY_RUN=${LVFACE_DRY_RUN:-}
[ "${1:-}" = "--dry-run" ] && { DRY_RUN=1; shift; }
PYTHON=${PYTHON:-python3}
if [ -z "${NPROC_PER_NODE:-}" ]; then
    NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
CMD=("$PYTHON" -m torch.distributed.run --nnodes "${NNODES:-1:8}" --nproc_per_node "$NPROC_PER_NODE"
     --max-restarts "${MAX_RESTARTS:-3}" --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:-127.0.0.1:29400}"
     --rdzv_id "${RDZV_ID:-lvface}")
[ -n "${RDZV_CONF:-}" ] && CMD+=(--rdzv_conf "$RDZV_CONF")
CMD+=(-m lvface.train --ds_config "${DS_CONFIG:-configs/zero2.json}" checkpoint.resume=auto "$@")

if [ -n "$DRY_RUN" ]; then
    echo "# ${CMD[*]}"
    exit 0
fi
exec "${CMD[@]}"
