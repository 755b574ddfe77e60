#!/usr/bin/env bash
# LVFace under mpirun (Open MPI or MPICH) with mpi4py: DeepSpeed's MPI discovery sets the ranks and
# broadcasts rank 0's address as the master.
#   launch/mpirun.sh -np 16 --hostfile hosts -- --config configs/lvface_vit_b_wf42m.yaml
#   launch/mpirun.sh -np 2 -- --config configs/demo.yaml          # on one CPU machine
#   launch/mpirun.sh --dry-run -np 64 --hostfile launch/hostfile.example -- --config configs/lvface_vit_l_wf42m.yaml
#       # prints the mpirun command and the ranks each node gets (by slot, in hostfile order); runs nothing
# Arguments before "--" go to mpirun, after it to lvface/train.py. LVFACE_DRY_RUN=1 is --dry-run.
# A hostfile may be Open MPI's ("node01 slots=8") or DeepSpeed's (the same syntax).
set -euo pipefail
DRY_RUN=${LVFACE_DRY_RUN:-}
[ "${1:-}" = "--dry-run" ] && { DRY_RUN=1; shift; }
MPI_ARGS=()
NP="" HOSTFILE=""
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    case "$1" in
        -np|-n) NP=$2 ;;
        --hostfile|-hostfile|--machinefile|-machinefile) HOSTFILE=$2 ;;
    esac
    MPI_ARGS+=("$1"); shift
done
[ "${1:-}" = "--" ] && shift
EXTRA=()
[ "$(id -u)" = 0 ] && EXTRA+=(--allow-run-as-root --oversubscribe)
# NCCL_* variables (launch/README.md) are forwarded to every rank when set.
for var in $(compgen -e | grep '^NCCL_' || true); do EXTRA+=(-x "$var"); done
CMD=(mpirun "${EXTRA[@]}" "${MPI_ARGS[@]}" -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH
     python -u lvface/train.py --ds_config "${DS_CONFIG:-configs/zero2.json}" "$@")

if [ -n "$DRY_RUN" ]; then
    echo "# ${CMD[*]}"
    if [ -z "$HOSTFILE" ]; then
        echo "[localhost] ranks 0..$(( ${NP:-1} - 1 )): python -u lvface/train.py --ds_config ${DS_CONFIG:-configs/zero2.json} $*"
        exit 0
    fi
    rank=0
    while read -r host rest; do
        case "$host" in ''|'#'*) continue ;; esac
        slots=$(sed -n 's/.*slots=\([0-9]*\).*/\1/p' <<< "$rest"); slots=${slots:-1}
        [ -n "$NP" ] && [ "$rank" -ge "$NP" ] && break
        last=$(( rank + slots - 1 )); [ -n "$NP" ] && [ "$last" -ge "$NP" ] && last=$(( NP - 1 ))
        echo "[$host] ranks $rank..$last (OMPI_COMM_WORLD_LOCAL_RANK 0..$(( last - rank ))): python -u lvface/train.py --ds_config ${DS_CONFIG:-configs/zero2.json} $*"
        rank=$(( last + 1 ))
    done < "$HOSTFILE"
    exit 0
fi
exec "${CMD[@]}"
