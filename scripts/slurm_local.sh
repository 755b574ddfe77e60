#!/usr/bin/env bash
# A real single-node SLURM on this machine, for tests/test_slurm_real.py: munged, slurmctld and slurmd
# from the distribution's packages (Debian/Ubuntu: slurm-wlm, munge), all state in one folder.
#
#   bash scripts/slurm_local.sh up      # start it; prints `export SLURM_CONF=...` for sbatch/squeue/scontrol
#   bash scripts/slurm_local.sh down    # stop the three daemons and remove the folder
#   bash scripts/slurm_local.sh status  # exit 0 when the node is up and idle or allocated
#
# LVFACE_SLURM_DIR names the folder (default /tmp/lvface-slurm). The cluster has one node (this host,
# as 127.0.0.1) with this host's CPU count and one partition; no cgroups, no accounting database (jobs
# stay in `scontrol show job` for an hour after they end, and every end is logged to jobcomp.txt).
# It runs as root (SlurmUser=root): tasks run as the submitting user.
set -euo pipefail
DIR=${LVFACE_SLURM_DIR:-/tmp/lvface-slurm}
CONF=$DIR/slurm.conf
NODE=$(hostname -s)

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

node_state() { SLURM_CONF=$CONF scontrol show node "$NODE" -o 2>/dev/null | sed -n 's/.* State=\([^ ]*\).*/\1/p'; }

stop_pid() {  # stop the daemon whose pid file is $1 (SIGTERM, then SIGKILL after 10 s)
    [ -f "$1" ] || return 0
    local pid
    pid=$(cat "$1")
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
}

down() {
    stop_pid "$DIR/slurmd.pid"
    stop_pid "$DIR/slurmctld.pid"
    stop_pid "$DIR/munged.pid"
    rm -rf "$DIR"
}

up() {
    for tool in munged mungekey slurmctld slurmd sbatch scontrol; do
        command -v "$tool" >/dev/null 2>&1 || die "$tool not found: install the packages (apt-get install -y slurm-wlm munge)"
    done
    [ "$(id -u)" -eq 0 ] || die "run as root (the daemons run as root here)"
    [ -e "$CONF" ] && die "$DIR holds a running or stale cluster: run '$0 down' first"
    mkdir -p "$DIR"/state "$DIR"/spool
    chmod 700 "$DIR"
    mungekey --create --keyfile="$DIR/munge.key" --force
    chmod 600 "$DIR/munge.key"
    munged --force --key-file="$DIR/munge.key" --socket="$DIR/munge.sock" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" \
        || die "munged did not start: $(tail -3 "$DIR/munged.log" 2>/dev/null)"
    # The CPUs this process may run on: GNU nproc caps its answer at OMP_NUM_THREADS, and a node
    # configured with fewer CPUs than a job's tasks never starts it (pending: PartitionConfig)
    CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    cat > "$CONF" <<CONF
ClusterName=lvface
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge.sock
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=30
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
    slurmctld -f "$CONF" -c || die "slurmctld did not start: $(tail -5 "$DIR/slurmctld.log" 2>/dev/null)"
    slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start: $(tail -5 "$DIR/slurmd.log" 2>/dev/null)"
    for _ in $(seq 150); do
        case "$(node_state)" in IDLE*|ALLOCATED*|MIXED*) echo "export SLURM_CONF=$CONF"; return 0;; esac
        sleep 0.2
    done
    die "node $NODE did not come up (state: $(node_state)); see $DIR/slurmctld.log and $DIR/slurmd.log"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) case "$(node_state)" in IDLE*|ALLOCATED*|MIXED*) exit 0;; *) exit 1;; esac ;;
    *) die "usage: $0 up|down|status" ;;
esac
