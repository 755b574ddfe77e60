"""The GPU checks of benchmarks/gpu_check.sh, one stage after another, each in its own process group
with its own time budget (PLAN), inside one overall budget (GPU_CHECK_BUDGET_S, default 450 s: the
whole call, install included, stays under 8 minutes). After every stage the results so far are written
to $OUT/gpu_check.json (a stage that hangs or the call's limit loses nothing already measured); a
stage that fails is recorded with its error, the next one runs, and the exit status is 1.

Order (what must be measured first): env (device, driver, versions) -> step_device (whole training
steps of ViT-T and ViT-L fed from images already on the device: the compute bound; images/s, MFU) ->
head (bench_head per impl and shape) -> micro (the Partial-FC sampler at the training rate r=0.3 and
the EPL update) -> step (the same steps fed by lvface's real loader through lvface.train:
bench_step.py; set beside step_device it says whether the loader or the GPU bounds the step) -> tests
(pytest -m cuda) -> apex; then dali and backbone with the time left over.

A stage's process starts its own session (process group); past its limit the whole group is killed
(SIGTERM, then SIGKILL): ranks, loader workers and pytest workers go with it, and the GPU is free for the
next stage. SIGTERM/SIGINT to this script (the shell's `timeout`) kills the running stage's group too.

MFU = (3 x forward FLOPs per image (lvface.models.forward_flops_per_image, from the model config) plus
the head's GEMMs, 6 x classes x 512 per image) x images/s over the card's dense bf16 peak (H100 / H200:
989 TFLOP/s; other cards: not computed).

`--dry-run` (or GPU_CHECK_DRY=1) runs every stage with tiny sizes on the CPU (the plumbing, not the
figures), as tests/test_gpu_check.py and tests/test_gpu_readiness.py do; GPU_CHECK_MEMORY_MB overrides
the memory the fit check assumes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
MB = 1 << 20

PLAN = (("env", 10), ("step_device", 110), ("head", 120), ("micro", 25), ("step", 100), ("tests", 60),
        ("apex", 25))
"""(stage, budget in seconds), in the order they run: the sum fits the 450 s budget, and the stages that
must be measured (the ViT-L step and the head) come first. dali and backbone run with the time left."""
LEFTOVER = ("dali", "backbone")
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
"""Dense bf16 tensor-core peak by card (the SXM parts' datasheet figures, no sparsity)."""
KILL_GRACE_S = 5.0


class Check:
    def __init__(self, out: Path, budget_s: float, dry: bool):
        self.out, self.dry = out, dry
        self.deadline = time.monotonic() + budget_s
        self.stage_deadline = self.deadline
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

    def begin(self, stage: str) -> None:
        """Start `stage`'s budget (PLAN; the stages of LEFTOVER get what is left), capped by the overall one."""
        budget = dict(PLAN).get(stage, self.remaining())
        self.stage_deadline = min(time.monotonic() + budget, self.deadline)

    def run(self, stage: str, argv: list[str], limit_s: float, json_file: Path | None = None, **fields) -> dict:
        """Run one benchmark process in its own process group; record status, seconds, its JSON records
        and its output's tail. The limit is the smallest of limit_s, the stage's and the overall budget."""
        limit = min(limit_s, self.stage_deadline - time.monotonic(), self.remaining() - 5)
        if limit < 10:
            spent = "overall" if self.remaining() - 5 <= limit else "stage"
            return self.record(stage, status="skipped", reason=f"{spent} budget spent ({max(limit, 0):.0f} s left)",
                               **fields)
        print(f"[gpu_check] {stage}: {shlex.join(argv)} (limit {limit:.0f} s)", flush=True)
        start = time.monotonic()
        code, output = run_in_own_group(argv, limit)
        seconds = time.monotonic() - start
        sys.stdout.write(output[-4000:])
        entry = {"status": "ok" if code == 0 else "failed", "returncode": code, "seconds": round(seconds, 1),
                 "command": shlex.join(argv), **fields}
        if json_file is not None and json_file.is_file():
            entry["records"] = json.loads(json_file.read_text())  # partial records of a timed-out run too
        if code != 0:
            entry["output_tail"] = output[-2000:]
        return self.record(stage, **entry)

    def failed(self) -> list[str]:
        return [entry["stage"] for entry in self.results["stages"] if entry.get("status") == "failed"]


_RUNNING: list[subprocess.Popen] = []  # the stage process under way, for the signal handler


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group of `proc` (its session), SIGKILL after KILL_GRACE_S."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _group_alive(proc.pid):
            proc.poll()  # reap the leader, or its zombie keeps the group alive
            time.sleep(0.1)


def run_in_own_group(argv: list[str], limit_s: float) -> tuple[int | str, str]:
    """(returncode or "timeout", output): `argv` in a new session; on timeout its whole group is killed,
    and so is whatever the stage left running when it returned."""
    with tempfile.TemporaryFile(mode="w+") as log_file:  # a file, not a pipe: a stray child cannot block us
        proc = subprocess.Popen(argv, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        _RUNNING.append(proc)
        try:
            code: int | str = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            code = "timeout"
        finally:
            kill_group(proc)
            proc.wait()
            _RUNNING.remove(proc)
        log_file.seek(0)
        return code, log_file.read()


def _on_signal(signum, frame) -> None:
    for proc in list(_RUNNING):
        kill_group(proc)
    raise SystemExit(128 + signum)


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


def stage_head(check: "Check", facts: dict, dry: bool, py: str) -> None:
    """The head benchmark per impl and shape (bench_head.py)."""
    scratch = check.scratch
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


def model_flops(record: dict, classes: int) -> float:
    """FLOPs of one training step's images per image: 3 x the backbone's forward (lvface.models) plus the
    head's three GEMMs per image (logits, dx, dW: 6 x classes x 512)."""
    from lvface.models import VIT_VARIANTS, forward_flops_per_image

    return 3 * forward_flops_per_image(VIT_VARIANTS[record["model"]]) + 6 * classes * 512


def add_mfu(entry: dict, classes: int, device_name: str | None) -> None:
    """Model TFLOP/s and MFU (against PEAK_BF16_TFLOPS of the card, where known) on each step record."""
    peak = next((tflops for card, tflops in PEAK_BF16_TFLOPS.items() if card in (device_name or "")), None)
    for record in entry.get("records") or []:
        if not isinstance(record, dict) or "images_per_s" not in record or "model" not in record:
            continue
        tflops = model_flops(record, classes) * record["images_per_s"] / 1e12
        record["model_tflops"] = tflops
        record["mfu"] = tflops / peak if peak else None


def device_fed_steps(argv: list[str]) -> int:
    """`gpu_check.py step-device ...`: whole train_steps (the real engine, head and optimizers of
    lvface.engine) of each model on one device, fed from a batch already on the device (no loader), as
    bench_step.py's records: model, images_per_s, step_s."""
    parser = argparse.ArgumentParser(prog="gpu_check.py step-device")
    for name, kind in (("--batch", int), ("--classes", int), ("--warmup", int), ("--steps", int), ("--json", str)):
        parser.add_argument(name, type=kind, required=True)
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    import torch
    import torch.distributed as dist

    from lvface.distributed import free_port

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    device = torch.device(args.device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    records = []
    for model in args.models:
        seconds = _time_device_steps(model, args, device, dist.group.WORLD)
        records.append({"model": model, "source": "device", "batch": args.batch, "classes": args.classes,
                        "device": str(device), "step_s": seconds, "images_per_s": args.batch / seconds})
        print(f"step-device {model}: {records[-1]['images_per_s']:.1f} img/s ({seconds * 1000:.1f} ms/step)",
              flush=True)
        Path(args.json).write_text(json.dumps(records, indent=1))
    dist.destroy_process_group()
    return 0


def _time_device_steps(model: str, args, device, group) -> float:
    """Mean seconds of a train_step after the warm-up ones (synchronised at the ends only)."""
    import torch

    from lvface.config import from_dict
    from lvface.engine import build_ds_config, build_engine, param_groups, set_matmul_precision, train_step
    from lvface.heads import ShardedMarginHead, build_head_optimizer
    from lvface.models import build_vit
    from lvface.models.vit import no_weight_decay_names

    cfg = from_dict({"model": {"name": model}, "data": {"batch_size": args.batch}})  # the training defaults
    set_matmul_precision(cfg.train.tf32, device)
    backbone = build_vit(model).to(device)
    ds = build_ds_config(REPO / "configs" / "zero2.json", cfg, 1, device)
    engine = build_engine(backbone, ds, param_groups(backbone, cfg.optimizer.weight_decay,
                                                     no_weight_decay_names(backbone)), lambda step: 1.0)
    head = ShardedMarginHead(args.classes, cfg.model.num_features, cfg.loss, group=group, seed=0).to(device)
    head_optimizer = build_head_optimizer(head, cfg.optimizer)
    images = torch.randn(args.batch, 3, 112, 112, device=device)
    labels = torch.randint(0, args.classes, (args.batch,), device=device)

    def step():
        train_step(engine, head, head_optimizer, lambda: (images, labels), accumulation=1, group=group)

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / args.steps


def stage_tests(check: Check, dry: bool, py: str) -> None:
    """Everything marked cuda (tests/test_cuda.py; kernel tests run natively, not interpreted)."""
    env_note = "TRITON_INTERPRET unset: kernels compiled for the device"
    os.environ.pop("TRITON_INTERPRET", None)
    tests = ["tests/test_cuda.py"] if dry else ["tests"]
    check.run("tests", [py, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *tests],
              limit_s=150, note=env_note)


def stage_micro(check: Check, dry: bool, py: str) -> None:
    """The sampler (at the training rate r=0.3: a real sample) and the EPL update (bench_head --micro)."""
    json_file = check.scratch / "head_micro.json"
    micro_device = (["--device", "cpu", "--threads", "1", "--batch", "64", "--classes", "1000"] if dry else
                    ["--device", "cuda", "--batch", "24576", "--classes", "32187"])
    check.run("micro", [py, str(BENCH / "bench_head.py"), "--micro", "sampler", "epl", "--sample-rate", "0.3",
                        *micro_device, "--json", str(json_file)], limit_s=60, json_file=json_file, sample_rate=0.3)


def _step_sizes(dry: bool) -> tuple[list[str], int, list[str]]:
    """(models, classes, --batch/--warmup/--steps arguments) of the step stages."""
    if dry:
        return ["vit_demo"], 50, ["--batch", "4", "--warmup", "1", "--steps", "1"]
    return ["vit_t", "vit_l"], 32187, ["--batch", "384", "--warmup", "3", "--steps", "10"]


def stage_step_device(check: Check, facts: dict, dry: bool, py: str) -> None:
    models, classes, sizes = _step_sizes(dry)
    json_file = check.scratch / "step_device.json"
    entry = check.run("step_device", [py, str(Path(__file__).resolve()), "step-device", "--models", *models,
                                      "--classes", str(classes), *sizes, "--device", "cpu" if dry else "cuda",
                                      "--json", str(json_file)], limit_s=110, json_file=json_file, source="device")
    add_mfu(entry, classes, facts.get("device_name"))
    check.write()


def stage_step_loader(check: Check, facts: dict, dry: bool, py: str) -> None:
    """The same steps through lvface.train with its real loader (bench_step.py). DeepSpeed's FusedAdam
    would be JIT-compiled on a bare node: lvface.engine picks torch's fused AdamW there and logs it."""
    models, classes, sizes = _step_sizes(dry)
    json_file = check.scratch / "step.json"
    check.run("step", [py, str(BENCH / "bench_step.py"), "--models", *models, "--classes", str(classes), *sizes,
                       "--ds-config", str(REPO / "configs" / "zero2.json"), "--json", str(json_file)],
              limit_s=100, json_file=json_file, source="loader")
    entry = check.results["stages"][-1]
    add_mfu(entry, classes, facts.get("device_name"))
    check.results["bound"] = step_bounds(check.results["stages"])
    check.write()


def step_bounds(stages: list[dict]) -> dict:
    """Per model: device-fed and loader-fed images/s, and which bounds the training step (the loader
    when it delivers under 90% of what the device-fed step reaches)."""
    rates: dict[str, dict] = {}
    for entry in stages:
        if entry["stage"] in ("step_device", "step"):
            for record in entry.get("records") or []:
                if isinstance(record, dict) and "images_per_s" in record:
                    rates.setdefault(record["model"], {})[entry["stage"]] = record["images_per_s"]
    out = {}
    for model, rate in rates.items():
        device, loader = rate.get("step_device"), rate.get("step")
        bound = None if device is None or loader is None else ("loader" if loader < 0.9 * device else "device")
        out[model] = {"device_fed_images_per_s": device, "loader_fed_images_per_s": loader, "bound": bound}
    return out


def stage_apex(check: Check, dry: bool, py: str) -> None:
    """apex against torch's own, where importable (the script records its absence itself)."""
    json_file = check.scratch / "apex.json"
    apex_sizes = ["--tokens", "4", "16", "32", "--classes", "100", "--dim", "16"] if dry else []
    check.run("apex", [py, str(BENCH / "bench_apex.py"), *apex_sizes, "--json", str(json_file)], limit_s=60,
              json_file=json_file)


def stage_dali(check: Check, facts: dict, dry: bool, py: str) -> None:
    """GPU ("mixed") decode where DALI is installed."""
    if not facts["dali_available"]:
        check.record("dali", status="skipped", reason="nvidia-dali is not installed here (its CUDA wheel, hundreds "
                     "of MB, cannot travel with the checkout): no GPU decode figure; the torch loader was used")
    elif dry:
        check.record("dali", status="skipped", reason="dry run: DALI's mixed decode needs a GPU")
    else:
        json_file = check.scratch / "data.json"
        check.run("dali", [py, str(BENCH / "bench_data.py"), "--loaders", "dali-gpu", "dali", "torch", "--threads", "4",
                           "--augment", "flip", "--images", "4096", "--repeats", "2", "--json", str(json_file)],
                  limit_s=90, json_file=json_file)


def stage_backbone(check: Check, dry: bool, py: str) -> None:
    if dry:
        check.record("backbone", status="skipped", reason="dry run: the backbone alone is timed on a GPU only")
        return
    json_file = check.scratch / "backbone.json"
    check.run("backbone", [py, str(BENCH / "bench_backbone.py"), "--models", "vit_t", "vit_l", "--batch", "128",
                           "--dtype", "bf16", "--device", "cuda", "--warmup", "3", "--steps", "10",
                           "--json", str(json_file)], limit_s=90, json_file=json_file)


def print_summary(check: Check, facts: dict, dry: bool) -> None:
    """The table at the end of the output (the device tool's reply carries the end)."""
    print("\n[gpu_check] summary" + (" (dry run, CPU)" if dry else f" on {facts.get('device_name')}"))
    for entry in check.results["stages"]:
        extra = {k: entry[k] for k in ("impl", "batch", "classes", "source") if k in entry}
        print(f"  {entry['stage']:11} {entry['status']:8} {entry.get('seconds', ''):>6} {extra or ''} "
              f"{entry.get('reason', '')}")
        for record in entry.get("records", []) if isinstance(entry.get("records"), list) else []:
            keys = ("model", "impl", "bench", "s_per_step", "step_ms", "step_s", "images_per_s", "model_tflops", "mfu",
                    "peak_cuda_mb", "ms", "part")
            print("              " + " ".join(f"{k}={record[k]:.4g}" if isinstance(record.get(k), float)
                                              else f"{k}={record[k]}" for k in keys if record.get(k) is not None))
    for model, bound in check.results.get("bound", {}).items():
        print(f"  bound {model}: {bound}")
    failed = check.failed()
    print(f"[gpu_check] {'FAILED stages: ' + ', '.join(failed) if failed else 'every stage ok or skipped'}")


def run_env(check: Check, dry: bool) -> dict | None:
    """The env stage; None when the check cannot go on (no deepspeed/triton, or no CUDA outside a dry run)."""
    facts = device_facts(dry)
    check.results["env"] = facts
    check.record("env", status="ok", **{k: facts.get(k) for k in ("device_name", "nvidia_smi")})
    missing = [name for name in ("deepspeed", "triton") if str(facts[name]).startswith("absent")]
    if missing and not dry:
        check.record("all", status="failed", reason=f"{', '.join(missing)} does not import: {facts[missing[0]]}; "
                     "run benchmarks/fetch_gpu_wheels.sh and carry .whl")
        return None
    if not facts["cuda_available"] and not dry:
        check.record("all", status="failed", reason="no CUDA device: run with --dry-run for the CPU dry run")
        return None
    return facts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["step-device"]:
        return device_fed_steps(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (also GPU_CHECK_DRY=1)")
    args = parser.parse_args(argv)
    dry = args.dry_run or os.environ.get("GPU_CHECK_DRY") == "1"
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    check = Check(Path(os.environ.get("OUT") or "gpu_out"), float(os.environ.get("GPU_CHECK_BUDGET_S", "450")), dry)
    check.begin("env")
    facts = run_env(check, dry)
    if facts is None:
        return 1
    py = sys.executable
    stages = {
        "step_device": lambda: stage_step_device(check, facts, dry, py),
        "head": lambda: stage_head(check, facts, dry, py),
        "micro": lambda: stage_micro(check, dry, py),
        "step": lambda: stage_step_loader(check, facts, dry, py),
        "tests": lambda: stage_tests(check, dry, py),
        "apex": lambda: stage_apex(check, dry, py),
        "dali": lambda: stage_dali(check, facts, dry, py),
        "backbone": lambda: stage_backbone(check, dry, py),
    }
    for name in [stage for stage, _ in PLAN[1:]] + list(LEFTOVER):
        check.begin(name)
        stages[name]()
    print_summary(check, facts, dry)
    return 1 if check.failed() else 0


if __name__ == "__main__":
    sys.exit(main())
