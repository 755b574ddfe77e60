#!/usr/bin/env bash
# DeepSpeed's launcher on this machine, on a master port that is free:
#   bash scripts/launch_local.sh [launcher options] -- SCRIPT [its arguments]
#   bash scripts/launch_local.sh --num_gpus 2 -- lvface/train.py --ds_config configs/zero2.json --config configs/demo.yaml
# Launcher options are deepspeed's (--num_gpus N, --include localhost:0,1, --master_port P, --hostfile H, ...).
# The master port is --master_port P or MASTER_PORT=P when given (refused at once if taken), else a free
# one; without --num_gpus / --include / --hostfile, --num_gpus ${RANKS:-2}. With --hostfile every host is
# checked for passwordless ssh first (launch/check_ssh.sh), which DeepSpeed's launcher needs.
set -euo pipefail
cd "$(dirname "$0")/.."
LAUNCHER=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do LAUNCHER+=("$1"); shift; done
[ $# -gt 0 ] || { echo "launch_local.sh: usage: launch_local.sh [launcher options] -- SCRIPT [arguments]" >&2; exit 2; }
shift

port="" devices="" hostfile=""
for ((i = 0; i < ${#LAUNCHER[@]}; i++)); do
    case "${LAUNCHER[$i]}" in
        --master_port) port=${LAUNCHER[$((i + 1))]:-} ;;
        --master_port=*) port=${LAUNCHER[$i]#*=} ;;
        --num_gpus|--num_gpus=*|--include|--include=*|-i) devices=1 ;;
        --hostfile) hostfile=${LAUNCHER[$((i + 1))]:-}; devices=1 ;;
        --hostfile=*) hostfile=${LAUNCHER[$i]#*=}; devices=1 ;;
    esac
done
if [ -z "$port" ]; then
    port=${MASTER_PORT:-$(python3 -c "from lvface.distributed import free_port; print(free_port())")}
    LAUNCHER+=(--master_port "$port")
fi
if ! python3 -c "import socket, sys; socket.socket().bind(('', int(sys.argv[1])))" "$port" 2>/dev/null; then
    echo "launch_local.sh: master port $port is in use (another run or service holds it); give a free one" \
         "(--master_port P or MASTER_PORT=P), or leave both out and a free port is chosen" >&2
    exit 2
fi
[ -n "$devices" ] || LAUNCHER+=(--num_gpus "${RANKS:-2}")
if [ -n "$hostfile" ]; then
    bash launch/check_ssh.sh "$hostfile" >&2 || exit 1
fi
echo "launch_local.sh: deepspeed ${LAUNCHER[*]} $*"
exec deepspeed "${LAUNCHER[@]}" "$@"
