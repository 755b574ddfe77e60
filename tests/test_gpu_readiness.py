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
