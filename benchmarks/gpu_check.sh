#!/usr/bin/env bash
# The GPU checks in one call (for a lent H100/H200 through the device tool, or any CUDA machine):
# installs lvface, runs the CUDA-relevant tests, then the backbone, head, data and eval benchmarks on
# the GPU, writing JSON and a log under $OUT (default ./gpu_out). About 6-8 minutes on one H100.
#   device run: bash benchmarks/gpu_check.sh          (timeout_s 580)
# Record every figure in benchmarks/RESULTS.md with the card's name (nvidia-smi line in the log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pip install -q -e ".[dali,export,dev]" || python3 -m pip install -q --no-deps -e .
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"

# Tests that exercise the CUDA paths when a GPU is present (loaders, head, export parity).
timeout 150 python3 -m pytest -q -x tests/test_sharded_softmax.py tests/test_dali.py tests/test_vit.py || echo "TESTS FAILED"

timeout 120 python3 benchmarks/bench_backbone.py --models vit_t vit_l --batch 128 --dtype bf16 fp32 --device cuda \
    --warmup 3 --steps 10 --json "$OUT/backbone.json" || echo "bench_backbone failed"
timeout 90 python3 benchmarks/bench_head.py --batch 8192 --classes 2000000 --dim 512 --sample-rate 1.0 --ranks 1 \
    --impl chunked dense --device cuda --steps 5 --json "$OUT/head.json" || echo "bench_head failed"
timeout 90 python3 benchmarks/bench_data.py --loaders dali-gpu dali torch --threads 4 --augment flip \
    --images 8192 --repeats 2 --json "$OUT/data.json" || echo "bench_data failed"
timeout 60 python3 benchmarks/bench_eval.py --models vit_t --batch 128 --device cuda --json "$OUT/eval.json" \
    || echo "bench_eval failed"
echo "gpu_check done"
