"""The GPU checks of benchmarks/gpu_check.sh, one stage after another, each in its own process with
its own time limit, inside one overall budget (GPU_CHECK_BUDGET_S, default 450 s: the whole call,
install included, stays under 8 minutes). After every stage the results so far are written to
$OUT/gpu_check.json (a stage that hangs or the call's limit loses nothing already measured); a stage
that fails is recorded with its error and the next one runs.

Stages: env (device, driver, versions) -> tests (pytest -m cuda: tests/test_cuda.py and every test
marked cuda, Triton kernels natively) -> head (bench_head per impl and shape; a shape that cannot fit
in the device's memory is dropped with its estimate) -> step (a full training step of ViT-T and
ViT-L with the fused head: images/s, MFU) -> dali (GPU "mixed" decode, where DALI is installed) ->
apex (apex against torch's own, where apex is installed) -> backbone (if time is left).

GPU_CHECK_DRY=1 runs every stage with tiny sizes on the CPU (the plumbing, not the figures), as
tests/test_gpu_readiness.py does; GPU_CHECK_MEMORY_MB overrides the memory the fit check assumes.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
MB = 1 << 20


class Check:
    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry = out, dry
        self.deadline = time.monotonic() + budget_s
        self.scratch = Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.results: dict = {"dry": dry, "stages": []}
        out.mkdir(parents=True, exist_ok=True)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def write(self) -> None:
        path = self.out / "gpu_check.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        os.replace(tmp, path)

    def record(self, stage: str, **fields) -> dict:
        entry = {"stage": stage, **fields}
        self.results["stages"].append(entry)
        self.write()
        status = fields.get("status")
        print(f"[gpu_check] {stage}: {status}" + (f" ({fields['reason']})" if fields.get("reason") else ""),
              flush=True)
        return entry

    def run(self, stage: str, argv: list[str], limit_s: float, json_file: Path | None = None, **fields) -> dict:
        """Run one benchmark process; record status, seconds, its JSON records and its output's tail."""
        limit = min(limit_s, self.remaining() - 5)
        if limit < 10:
            return self.record(stage, status="skipped", reason=f"overall budget spent ({self.remaining():.0f} s left)",
                               **fields)
        print(f"[gpu_check] {stage}: {shlex.join(argv)} (limit {limit:.0f} s)", flush=True)
        start = time.monotonic()
        try:
            proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=limit)
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            code = "timeout"
            output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        seconds = time.monotonic() - start
        sys.stdout.write(output[-4000:])
        entry = {"status": "ok" if code == 0 else "failed", "returncode": code, "seconds": round(seconds, 1),
                 "command": shlex.join(argv), **fields}
        if json_file is not None and json_file.is_file():
            entry["records"] = json.loads(json_file.read_text())  # partial records of a timed-out run too
        if code != 0:
            entry["output_tail"] = output[-2000:]
        return self.record(stage, **entry)


def device_facts(dry: bool) -> dict:
    import torch

    facts = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
             "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        free, total = torch.cuda.mem_get_info(0)
        facts.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                     memory_total_mb=total // MB, memory_free_mb=free // MB)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        facts["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        facts["nvidia_smi"] = None
    from lvface.data.loader import cuda_driver_version, dali_available

    facts["cuda_driver_version"] = cuda_driver_version()
    for name in ("deepspeed", "triton", "apex", "nvidia.dali"):
        try:
            module = __import__(name, fromlist=["__version__"])
            facts[name] = getattr(module, "__version__", "present")
        except Exception as exc:  # noqa: BLE001 - any import failure is a fact to record
            facts[name] = f"absent ({type(exc).__name__}: {exc})"[:200]
    facts["dali_available"] = dali_available()
    import lvface.kernels

    facts["lvface_kernels"] = lvface.kernels.__file__
    return facts


def head_memory_mb(impl: str, batch: int, classes: int, dim: int) -> float:
    """A generous estimate of one head step's device memory: W, P and dW (fp32), plus for dense the
    [batch, classes] logits and about two more of their size (softmax and gradient); the chunked and
    Triton paths keep O(batch * dim) beyond that."""
    centers = 3 * classes * dim * 4
    logits = 3 * batch * classes * 4 if impl == "dense" else 4 * batch * dim * 4
    return (centers + logits) / MB


def main() -> int:
    dry = os.environ.get("GPU_CHECK_DRY") == "1"
    out = Path(os.environ.get("OUT") or "gpu_out")
    check = Check(out, float(os.environ.get("GPU_CHECK_BUDGET_S", "450")), dry)
    py = sys.executable
    scratch = check.scratch

    # env
    facts = device_facts(dry)
    check.results["env"] = facts
    check.record("env", status="ok", **{k: facts.get(k) for k in ("device_name", "nvidia_smi")})
    missing = [name for name in ("deepspeed", "triton") if str(facts[name]).startswith("absent")]
    if missing and not dry:
        check.record("all", status="failed", reason=f"{', '.join(missing)} does not import: {facts[missing[0]]}; "
                     "run benchmarks/fetch_gpu_wheels.sh and carry .whl")
        return 1
    on_cuda = facts["cuda_available"] and not dry
    if not on_cuda and not dry:
        check.record("all", status="failed", reason="no CUDA device: run with GPU_CHECK_DRY=1 for the CPU dry run")
        return 1

    # tests: everything marked cuda (tests/test_cuda.py; kernel tests run natively, not interpreted)
    env_note = "TRITON_INTERPRET unset: kernels compiled for the device"
    os.environ.pop("TRITON_INTERPRET", None)
    tests = ["tests/test_cuda.py"] if dry else ["tests"]
    check.run("tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *tests],
              limit_s=150, note=env_note)

    # head: per impl, so that one failing (or absent) implementation leaves the others' figures
    from lvface.heads import IMPLS

    if dry:
        shapes = [dict(batch=64, classes=1000, dim=32), dict(batch=8192, classes=2_000_000, dim=512)]
        memory_mb = float(os.environ.get("GPU_CHECK_MEMORY_MB", "256"))
        common = ["--device", "cpu", "--ranks", "1", "--steps", "1", "--threads", "1"]
    else:
        # the per-rank shape of WebFace42M on 64 GPUs (issue 10), then the whole 2M classes on one GPU
        shapes = [dict(batch=24576, classes=32187, dim=512), dict(batch=8192, classes=2_000_000, dim=512)]
        memory_mb = float(os.environ.get("GPU_CHECK_MEMORY_MB", facts.get("memory_free_mb", 0)))
        # what training runs under train.precision=bf16: fp32 W, bf16 embeddings, loss.head_dtype=auto (bf16
        # copies for the Triton kernels; chunked and dense widen the embeddings to fp32)
        common = ["--device", "cuda", "--ranks", "1", "--steps", "5", "--dtype", "fp32", "--embeddings", "bf16",
                  "--head-dtype", "auto"]
    for number, shape in enumerate(shapes):
        # the atomic one-pass backward beside the two-pass one at the goal's shape (kernels/triton_margin_ce.py)
        for impl in ("triton", "triton_atomic", "dense", "chunked") if number == 0 else ("triton", "dense", "chunked"):
            fields = {"impl": impl, **shape, "sample_rate": 1.0}
            if impl not in IMPLS:
                check.record("head", status="skipped", reason=f"impl {impl!r} not in lvface.heads.IMPLS {list(IMPLS)}",
                             **fields)
                continue
            need = head_memory_mb(impl, **shape)
            if need > 0.9 * memory_mb:
                check.record("head", status="dropped", reason=f"needs ~{need / 1024:.1f} GiB, "
                             f"{memory_mb / 1024:.1f} GiB free", **fields)
                continue
            if dry and impl == "dense":
                # the dry run times one torch path (the plumbing) beside triton, which may fail on a CPU:
                # recorded, not fatal
                check.record("head", status="skipped", reason="dry run: chunked is the torch path timed", **fields)
                continue
            json_file = scratch / f"head_{impl}_{shape['classes']}.json"
            check.run("head", [py, str(BENCH / "bench_head.py"), "--impl", impl, "--batch", str(shape["batch"]),
                               "--classes", str(shape["classes"]), "--dim", str(shape["dim"]), "--sample-rate", "1.0",
                               *common, "--json", str(json_file)], limit_s=90, json_file=json_file, **fields)

    # the sampler and the EPL update against their torch compositions (kernels/pfc_sample.py, epl_update.py)
    json_file = scratch / "head_micro.json"
    micro_device = (["--device", "cpu", "--threads", "1", "--batch", "64", "--classes", "1000"] if dry else
                    ["--device", "cuda", "--batch", "24576", "--classes", "32187"])
    check.run("micro", [py, str(BENCH / "bench_head.py"), "--micro", "sampler", "epl", *micro_device,
                        "--json", str(json_file)], limit_s=60, json_file=json_file)

    # step: whole training steps of ViT-T and ViT-L with the fused head (bench_step.py runs lvface.train).
    # DeepSpeed's FusedAdam would be JIT-compiled on a bare node (minutes, and it needs nvcc): the check
    # uses torch's AdamW (fused on CUDA) through DeepSpeed's torch_adam switch, and says so.
    json_file = scratch / "step.json"
    if dry:
        sizes = ["--models", "vit_demo", "--batch", "4", "--classes", "50", "--warmup", "1", "--steps", "1"]
    else:
        sizes = ["--models", "vit_t", "vit_l", "--batch", "384", "--classes", "32187", "--warmup", "3", "--steps", "10"]
    ds_config = json.loads((REPO / "configs" / "zero2.json").read_text())
    ds_config["optimizer"].setdefault("params", {}).update(torch_adam=True, **({} if dry else {"fused": True}))
    ds_file = scratch / "zero2_torch_adam.json"
    ds_file.write_text(json.dumps(ds_config))
    check.run("step", [py, str(BENCH / "bench_step.py"), *sizes, "--ds-config", str(ds_file), "--json", str(json_file)],
              limit_s=180, json_file=json_file, adam="torch AdamW via DeepSpeed torch_adam")

    # dali: GPU ("mixed") decode where DALI is installed
    if not facts["dali_available"]:
        check.record("dali", status="skipped", reason="nvidia-dali is not installed here (its CUDA wheel, hundreds "
                     "of MB, cannot travel with the checkout): no GPU decode figure; the torch loader was used")
    elif dry:
        check.record("dali", status="skipped", reason="dry run: DALI's mixed decode needs a GPU")
    else:
        json_file = scratch / "data.json"
        check.run("dali", [py, str(BENCH / "bench_data.py"), "--loaders", "dali-gpu", "dali", "torch", "--threads", "4",
                           "--augment", "flip", "--images", "4096", "--repeats", "2", "--json", str(json_file)],
                  limit_s=90, json_file=json_file)

    # apex: against torch's own, where importable (the script records its absence itself)
    json_file = scratch / "apex.json"
    apex_sizes = ["--tokens", "4", "16", "32", "--classes", "100", "--dim", "16"] if dry else []
    check.run("apex", [py, str(BENCH / "bench_apex.py"), *apex_sizes, "--json", str(json_file)], limit_s=60,
              json_file=json_file)

    # backbone alone, if time is left
    if not dry:
        json_file = scratch / "backbone.json"
        check.run("backbone", [py, str(BENCH / "bench_backbone.py"), "--models", "vit_t", "vit_l", "--batch", "128",
                               "--dtype", "bf16", "--device", "cuda", "--warmup", "3", "--steps", "10",
                               "--json", str(json_file)], limit_s=90, json_file=json_file)

    # summary (the device tool's reply carries the end of the output)
    print("\n[gpu_check] summary" + (" (dry run, CPU)" if dry else f" on {facts.get('device_name')}"))
    for entry in check.results["stages"]:
        extra = {k: entry[k] for k in ("impl", "batch", "classes") if k in entry}
        print(f"  {entry['stage']:9} {entry['status']:8} {entry.get('seconds', ''):>6} {extra or ''} "
              f"{entry.get('reason', '')}")
        for record in entry.get("records", []) if isinstance(entry.get("records"), list) else []:
            keys = ("model", "impl", "s_per_step", "step_ms", "images_per_s", "mfu", "peak_cuda_mb", "ms", "part")
            print("            " + " ".join(f"{k}={record[k]:.4g}" if isinstance(record.get(k), float)
                                            else f"{k}={record[k]}" for k in keys if record.get(k) is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
