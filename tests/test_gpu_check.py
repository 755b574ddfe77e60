"""benchmarks/gpu_check.py on a CPU: the stage plan fits the budget with the must-measure stages first,
a failing stage makes the exit status non-zero, a hung stage's whole process group is killed, the MFU
and the loader-or-device bound are computed from the records; and the start-up choices a GPU run makes
(torch's fused AdamW where DeepSpeed's FusedAdam is not prebuilt)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402


def test_plan_fits_450_s_with_the_vit_l_step_and_the_head_first():
    stages = [name for name, _ in gpu_check.PLAN]
    assert sum(budget for _, budget in gpu_check.PLAN) <= 450
    assert stages[:3] == ["env", "step_device", "head"]  # measured before anything that may run long
    models, _, _ = gpu_check._step_sizes(dry=False)
    assert "vit_l" in models
    assert not set(stages) & set(gpu_check.LEFTOVER)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie waiting for its new parent is dead


def test_a_hung_stage_is_killed_with_its_whole_process_group(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # the stage starts a grandchild that ignores SIGTERM (it needs the SIGKILL), then hangs itself
    script = (f"import subprocess, time; p = subprocess.Popen(['bash', '-c', 'trap \"\" TERM; sleep 600']); "
              f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(600)")
    start = time.monotonic()
    code, output = gpu_check.run_in_own_group([sys.executable, "-c", script], limit_s=3)
    assert code == "timeout"
    assert time.monotonic() - start < 3 + gpu_check.KILL_GRACE_S + 5
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild), "the stage's grandchild survived the kill"


def test_a_stage_that_returns_leaves_nothing_running(tmp_path):
    pid_file = tmp_path / "orphan.pid"
    script = (f"import subprocess; p = subprocess.Popen(['sleep', '600']); open({str(pid_file)!r}, 'w')"
              f".write(str(p.pid))")
    code, _ = gpu_check.run_in_own_group([sys.executable, "-c", script], limit_s=30)
    assert code == 0
    time.sleep(0.5)
    assert not _alive(int(pid_file.read_text()))


def test_a_failed_stage_is_recorded_and_named(tmp_path):
    check = gpu_check.Check(tmp_path, budget_s=60, dry=True)
    check.begin("micro")
    entry = check.run("micro", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], limit_s=30)
    assert entry["status"] == "failed" and entry["returncode"] == 3 and "boom" in entry["output_tail"]
    assert check.failed() == ["micro"]
    assert json.loads((tmp_path / "gpu_check.json").read_text())["stages"][0]["status"] == "failed"
    check.begin("tests")
    check.stage_deadline = time.monotonic() + 4  # a stage whose budget is spent does not start
    assert check.run("tests", [sys.executable, "-c", "pass"], limit_s=30)["status"] == "skipped"


def test_dry_run_exits_non_zero_when_a_stage_fails(tmp_path):
    """The whole script on the CPU, with the pytest stage made to fail (a bad option): the other stages
    still run and are written, the exit status is 1 and the summary names the failed stage."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OUT=str(tmp_path), PYTEST_ADDOPTS="--no-such-option", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {entry["stage"]: entry["status"] for entry in results["stages"]}
    assert status["tests"] == "failed" and status["step_device"] == "ok" and status["step"] == "ok", status
    assert "FAILED stages: tests" in output
    # the step stages were fed from the device and from the loader, and the bound says which is slower
    bound = results["bound"]["vit_demo"]
    assert bound["device_fed_images_per_s"] > 0 and bound["loader_fed_images_per_s"] > 0
    assert bound["bound"] in ("device", "loader")
    (micro,) = [entry for entry in results["stages"] if entry["stage"] == "micro"]
    assert {r["sample_rate"] for r in micro["records"] if r["bench"] == "sampler"} == {0.3}


def test_mfu_counts_three_forwards_and_the_head_against_the_card_peak():
    from lvface.models import VIT_VARIANTS, forward_flops_per_image

    entry = {"records": [{"model": "vit_l", "images_per_s": 1000.0}, {"model": "vit_t", "images_per_s": 5000.0}]}
    gpu_check.add_mfu(entry, 32187, "NVIDIA H100 80GB HBM3")
    for record in entry["records"]:
        flops = 3 * forward_flops_per_image(VIT_VARIANTS[record["model"]]) + 6 * 32187 * 512
        assert record["model_tflops"] == pytest.approx(flops * record["images_per_s"] / 1e12, rel=1e-12)
        assert record["mfu"] == pytest.approx(record["model_tflops"] / 989.0, rel=1e-12)
    assert entry["records"][0]["model_tflops"] > 150  # ViT-L: 3 x 50.7 GFLOP x 1000 img/s
    unknown = {"records": [{"model": "vit_t", "images_per_s": 10.0}]}
    gpu_check.add_mfu(unknown, 100, "Some GPU")
    assert unknown["records"][0]["mfu"] is None


def test_bound_names_the_loader_when_it_delivers_less_than_the_device():
    stages = [{"stage": "step_device", "records": [{"model": "vit_t", "images_per_s": 20000.0},
                                                   {"model": "vit_l", "images_per_s": 2000.0}]},
              {"stage": "step", "records": [{"model": "vit_t", "images_per_s": 1900.0},
                                            {"model": "vit_l", "images_per_s": 1950.0}]}]
    bounds = gpu_check.step_bounds(stages)
    assert bounds["vit_t"]["bound"] == "loader" and bounds["vit_l"]["bound"] == "device"


def test_cuda_without_a_prebuilt_fused_adam_takes_torch_fused_adamw():
    from lvface.config import from_dict
    from lvface.engine import build_ds_config, fused_adam_prebuilt

    cfg = from_dict({"train": {"precision": "fp32"}})
    cuda = build_ds_config(REPO / "configs" / "zero2.json", cfg, 1, torch.device("cuda"))
    params = cuda["optimizer"]["params"]
    if fused_adam_prebuilt():
        assert "torch_adam" not in params  # DeepSpeed's own FusedAdam, already built
    else:
        assert params["torch_adam"] is True and params["fused"] is True
    cpu = build_ds_config(REPO / "configs" / "zero2.json", cfg, 1, torch.device("cpu"))
    assert cpu["optimizer"]["params"]["torch_adam"] is True and "fused" not in cpu["optimizer"]["params"]
    chosen = {"type": "AdamW", "params": {"torch_adam": False}}  # a choice in the DeepSpeed config is kept
    kept = build_ds_config({"optimizer": chosen}, cfg, 1, torch.device("cuda"))
    assert kept["optimizer"]["params"]["torch_adam"] is False and "fused" not in kept["optimizer"]["params"]
