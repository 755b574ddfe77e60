#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels benchmarks/gpu_check.sh installs on an offline GPU node.
#
# The node (e.g. the device tool's nvidia-h200: Python 3.12, torch 2.11 + CUDA 13, triton, onnx,
# mpi4py, opencv, pyarrow, prometheus-client, numpy, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm,
# pyyaml, pillow) lacks DeepSpeed and DeepSpeed's pure-Python needs: hjson and pydantic 2 (with its
# compiled core, annotated-types, typing-inspection and a typing-extensions new enough for it).
# DeepSpeed is published as a source archive only, so it is built here into a pure-Python wheel
# (DS_BUILD_OPS=0: its CUDA ops are JIT-compiled on the node if used; the Dockerfile prebuilds them).
# DALI's CUDA wheel (~600 MB) cannot travel within the 64 MiB a device call carries: gpu_check.sh
# runs without DALI and says so.
#
#   bash benchmarks/fetch_gpu_wheels.sh          # then: device run with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${WHEEL_DIR:-.whl}
mkdir -p "$DEST"
DEEPSPEED=${DEEPSPEED_VERSION:-0.19.8}
PLATFORM=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
          --platform manylinux1_x86_64)
# One version of each (two of one name stop the install); pydantic pins its core exactly.
WHEELS=(hjson==3.1.0 pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
        typing-extensions==4.15.0)
python3 -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$DEST" "${WHEELS[@]}"
if ! ls "$DEST"/deepspeed-"$DEEPSPEED"-*.whl >/dev/null 2>&1; then
    SDIST=$(mktemp -d)
    python3 -m pip download -q --no-deps --no-binary=:all: -d "$SDIST" "deepspeed==$DEEPSPEED"
    # building needs torch importable here (any build); no ops are compiled
    DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$SDIST"/deepspeed-*.tar.gz
    rm -rf "$SDIST"
fi
ls -l "$DEST"
TOTAL=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total $((TOTAL / 1024)) KiB in $(ls "$DEST"/*.whl | wc -l) wheels"
if [ "$TOTAL" -ge $((64 * 1024 * 1024)) ]; then
    echo "error: the wheels exceed the 64 MiB a device call carries; remove what the node already has" >&2
    exit 1
fi
