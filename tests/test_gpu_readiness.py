"""Decisions that only matter on a GPU node, tested here with injected facts: the loader choice
against the CUDA driver, the apex options where apex is absent, and benchmarks/gpu_check.sh's
plumbing in its dry mode."""

from __future__ import annotations

import builtins

import pytest
import torch

from lvface.config import ConfigError, load_config
from lvface.data.loader import choose_loader, cuda_driver_version
from lvface.heads import ShardedMarginHead, build_head_optimizer

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")


def test_loader_auto_takes_dali_when_the_driver_fits():
    assert choose_loader("auto", device=CUDA, dali_importable=True, driver_version=13000,
                         dali_driver=13000) == ("dali", None)
    assert choose_loader("auto", device=CUDA, dali_importable=True, driver_version=13020,
                         dali_driver=13000) == ("dali", None)
    assert choose_loader("dali", device=CUDA, dali_importable=True, driver_version=13000,
                         dali_driver=13000) == ("dali", None)


@pytest.mark.parametrize("driver", [12080, None], ids=["cuda12.8-driver", "unreadable"])
def test_loader_auto_falls_back_to_torch_on_an_old_driver(driver):
    choice, message = choose_loader("auto", device=CUDA, dali_importable=True, driver_version=driver,
                                     dali_driver=13000)
    assert choice == "torch"
    assert "CUDA >= 13.0" in message and "data.loader=torch" in message
    if driver is not None:
        assert "CUDA 12.8" in message


def test_loader_dali_asked_for_on_an_old_driver_is_an_error():
    with pytest.raises(ConfigError, match=r"data\.loader=dali.*CUDA >= 13\.0.*CUDA 12\.8.*data\.loader=torch"):
        choose_loader("dali", device=CUDA, dali_importable=True, driver_version=12080, dali_driver=13000)


def test_loader_on_cpu_and_without_dali_is_unchanged():
    # CPU pipelines need no driver: auto keeps DALI where it imports, whatever the (absent) driver
    assert choose_loader("auto", device=CPU, dali_importable=True, driver_version=None,
                         dali_driver=None) == ("dali", None)
    assert choose_loader("auto", device=CUDA, dali_importable=False, driver_version=None,
                         dali_driver=None) == ("torch", None)
    assert choose_loader("torch", device=CUDA, dali_importable=True, driver_version=13000,
                         dali_driver=13000) == ("torch", None)
    with pytest.raises(ConfigError, match="nvidia-dali is not installed"):
        choose_loader("dali", device=CPU, dali_importable=False, driver_version=None, dali_driver=None)


def test_cuda_driver_version_is_a_number_or_none():
    version = cuda_driver_version()
    assert version is None or (isinstance(version, int) and version >= 1000)
    if not torch.cuda.is_available():
        return
    assert version is not None  # a working CUDA device implies a driver that answers


@pytest.fixture
def no_apex(monkeypatch):
    real_import = builtins.__import__

    def refuse(name, *args, **kwargs):
        if name == "apex" or name.startswith("apex."):
            raise ImportError("No module named 'apex'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", refuse)


def test_head_apex_without_apex_names_the_key(no_apex):
    cfg = load_config(None, ["optimizer.head_impl=apex", "optimizer.head_sparse_rows=false"])
    head = ShardedMarginHead(7, 16, cfg.loss, group=None, seed=0)
    with pytest.raises(ValueError, match=r"optimizer\.head_impl=apex.*not importable.*optimizer\.head_impl=torch"):
        build_head_optimizer(head, cfg.optimizer, sparse_rows=False, impl="apex")


def test_head_apex_needs_dense_rows():
    with pytest.raises(ConfigError, match=r"optimizer\.head_impl.*optimizer\.head_sparse_rows=false"):
        load_config(None, ["optimizer.head_impl=apex"])
    with pytest.raises(ConfigError, match=r"model\.norm_impl.*torch, apex"):
        load_config(None, ["model.norm_impl=fused"])
    cfg = load_config(None, ["model.norm_impl=apex", "optimizer.head_impl=apex", "optimizer.head_sparse_rows=false"])
    assert (cfg.model.norm_impl, cfg.optimizer.head_impl) == ("apex", "apex")  # a valid config on any machine


# --------------------------------------------------------------------------------------------------
# benchmarks/gpu_check.sh: the plumbing, on the CPU
# --------------------------------------------------------------------------------------------------

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def _gpu_check(out: Path, **env) -> tuple[int, dict, str]:
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**environ, "OUT": str(out), "GPU_CHECK_DRY": "1", **env})
    results = json.loads((out / "gpu_check.json").read_text())
    return proc.returncode, results, proc.stdout + proc.stderr


def test_head_memory_estimate_drops_the_dense_head_at_2m_classes():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gpu_check import head_memory_mb
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert head_memory_mb("dense", 8192, 2_000_000, 512) / 1024 > 160  # GiB: more than any one GPU holds
    assert head_memory_mb("chunked", 8192, 2_000_000, 512) / 1024 < 16  # W, P, dW and O(batch * dim)
    assert head_memory_mb("dense", 24576, 32187, 512) / 1024 < 16  # the per-rank shape fits


def test_gpu_check_dry_run_writes_every_stage(tmp_path):
    # Wall time ~25 s on an idle 2-core machine (user time ~24 s): five short processes.
    code, results, output = _gpu_check(tmp_path)
    assert code == 0, output[-3000:]
    assert results["dry"] is True
    assert results["env"]["lvface_kernels"].startswith(str(REPO))  # this checkout, through PYTHONPATH
    stages = {}
    for entry in results["stages"]:
        stages.setdefault(entry["stage"], []).append(entry)
    assert [e["status"] for e in stages["tests"]] == ["ok"]
    heads = {(e["impl"], e["classes"]): e for e in stages["head"]}
    assert heads[("chunked", 1000)]["status"] == "ok" and heads[("chunked", 1000)]["records"][0]["s_per_step"] > 0
    # triton is absent, or fails on a CPU: either way recorded, and the other figures are still written
    assert heads[("triton", 1000)]["status"] in ("skipped", "failed", "ok")
    assert heads[("dense", 2_000_000)]["status"] == "dropped" and "GiB" in heads[("dense", 2_000_000)]["reason"]
    (micro,) = stages["micro"]  # the sampler and the EPL update against their torch compositions
    assert micro["status"] == "ok" and {r["bench"] for r in micro["records"]} >= {"sampler", "epl"}, micro
    (step,) = stages["step"]
    assert step["status"] == "ok" and step["records"][0]["images_per_s"] > 0
    assert stages["dali"][0]["status"] == "skipped"
    assert stages["apex"][0]["status"] == "ok"
    assert (tmp_path / "gpu_check.log").is_file()


def test_gpu_check_stops_starting_stages_when_the_budget_is_spent(tmp_path):
    code, results, output = _gpu_check(tmp_path, GPU_CHECK_BUDGET_S="3")
    assert code == 0, output[-3000:]
    ran = [e for e in results["stages"] if e["stage"] != "env" and e["status"] not in ("skipped", "dropped")]
    assert ran == []
    assert any("budget spent" in e.get("reason", "") for e in results["stages"])
