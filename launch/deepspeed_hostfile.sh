#!/usr/bin/env bash
# LVFace with DeepSpeed's own launcher over a hostfile ("node01 slots=8" per line, passwordless ssh):
# the launcher ssh-es (pdsh) to every node and starts deepspeed.launcher.launch there, which starts one
# process per slot with RANK / LOCAL_RANK / WORLD_SIZE set.
#   launch/deepspeed_hostfile.sh launch/hostfile.example --config configs/lvface_vit_l_wf42m.yaml
#   launch/deepspeed_hostfile.sh --dry-run launch/hostfile.example --config configs/lvface_vit_l_wf42m.yaml
#       # prints the command each node runs (what pdsh would start there); runs nothing
# LVFACE_DRY_RUN=1 is --dry-run. The dry run also checks passwordless ssh to every host (launch/check_ssh.sh),
# which the launcher needs; a real run stops before starting anything when a host fails it.
# Exported NCCL_* variables travel through DeepSpeed's .deepspeed_env.
set -euo pipefail
DRY_RUN=${LVFACE_DRY_RUN:-}
[ "${1:-}" = "--dry-run" ] && { DRY_RUN=1; shift; }
HOSTFILE=${1:?usage: launch/deepspeed_hostfile.sh [--dry-run] HOSTFILE [train.py arguments]}
shift
DS_CONFIG=${DS_CONFIG:-configs/zero2.json}
MASTER_PORT=${MASTER_PORT:-29500}
TRAIN=(lvface/train.py --ds_config "$DS_CONFIG" "$@")

if [ -n "$DRY_RUN" ]; then
    # deepspeed.launcher.runner's per-node command: world_info is the urlsafe base64 of
    # {"host": [local GPU ids], ...} in hostfile order, node_rank the host's position.
    python3 - "$HOSTFILE" "$MASTER_PORT" "$PWD" "${TRAIN[@]}" <<'PY'
import base64, json, re, shlex, sys
hostfile, port, cwd, train = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
hosts = {}
for line in open(hostfile):
    line = line.split("#")[0].strip()
    if line:
        match = re.fullmatch(r"(\S+)\s+slots=(\d+)", line)
        if not match:
            sys.exit(f"{hostfile}: '{line}' is not 'HOST slots=N'")
        hosts[match[1]] = list(range(int(match[2])))
world_info = base64.urlsafe_b64encode(json.dumps(hosts).encode()).decode()
master = next(iter(hosts))
print(f"# deepspeed --hostfile {hostfile} --master_port {port} {' '.join(map(shlex.quote, train))}")
print(f"# {len(hosts)} nodes, {sum(map(len, hosts.values()))} ranks, master {master}:{port}")
rank = 0
for node_rank, (host, slots) in enumerate(hosts.items()):
    cmd = ["cd", cwd, ";", sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world_info}",
           f"--node_rank={node_rank}", f"--master_addr={master}", f"--master_port={port}", *train]
    print(f"[{host}] ranks {rank}..{rank + len(slots) - 1}: {' '.join(c if c == ';' else shlex.quote(c) for c in cmd)}")
    rank += len(slots)
PY
    bash "$(dirname "$0")/check_ssh.sh" "$HOSTFILE" || true  # a preview: report, do not fail
    exit 0
fi
bash "$(dirname "$0")/check_ssh.sh" "$HOSTFILE" >&2 || exit 1
exec deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT" "${TRAIN[@]}"
