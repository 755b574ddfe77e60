#!/usr/bin/env bash
# LVFace under mpirun (Open MPI or MPICH) with mpi4py: DeepSpeed's MPI discovery sets the ranks and
# broadcasts rank 0's address as the master.
#   launch/mpirun.sh -np 16 --hostfile hosts -- --config configs/lvface_vit_b_wf42m.yaml
#   launch/mpirun.sh -np 2 -- --config configs/demo.yaml          # on one CPU machine
# Arguments before "--" go to mpirun, after it to lvface/train.py.
set -euo pipefail
MPI_ARGS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do MPI_ARGS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
EXTRA=()
[ "$(id -u)" = 0 ] && EXTRA+=(--allow-run-as-root --oversubscribe)
exec mpirun "${EXTRA[@]}" "${MPI_ARGS[@]}" -x PATH -x LD_LIBRARY_PATH -x PYTHONPATH \
    python -u lvface/train.py --ds_config "${DS_CONFIG:-configs/zero2.json}" "$@"
