#!/usr/bin/env bash
# Can this machine reach every host of a DeepSpeed hostfile by ssh without a password? DeepSpeed's
# launcher starts the ranks of a hostfile through pdsh/ssh, on every host listed, localhost included;
# a host that asks for a password (or refuses ssh) fails there with a traceback. One line per host;
# exit 1 if any fails, with what to do.
#   bash launch/check_ssh.sh HOSTFILE
set -uo pipefail
HOSTFILE=${1:?usage: launch/check_ssh.sh HOSTFILE}
[ -r "$HOSTFILE" ] || { echo "check_ssh: hostfile $HOSTFILE: cannot read it" >&2; exit 2; }
failed=0
while read -r host _; do
    [ -n "$host" ] || continue
    if reason=$(ssh -o BatchMode=yes -o ConnectTimeout=5 "$host" true 2>&1 </dev/null); then
        echo "# ssh $host: ok (passwordless)"
    else
        echo "# ssh $host: FAILED: ${reason%%$'\n'*}"
        failed=1
    fi
done < <(sed 's/#.*//' "$HOSTFILE")
if [ "$failed" = 1 ]; then
    cat <<'TXT'
# A hostfile needs passwordless ssh from this machine to every host in it (ssh-keygen; ssh-copy-id HOST;
# `ssh -o BatchMode=yes HOST true` must succeed), also for localhost. On one machine no hostfile is needed:
#   deepspeed --num_gpus 2 lvface/train.py ...               (or --include localhost:0,1)
#   bash scripts/launch_local.sh --num_gpus 2 -- lvface/train.py ...   (a free master port too)
TXT
    exit 1
fi
