"""At most one host sync per optimizer step in lvface's own code: the read of the step's flags.

benchmarks/count_syncs.py counts, during one real lvface.engine.train_step (a ViT in a DeepSpeed
ZeRO-2 engine, the class-sharded head and its optimizer, a 1-rank gloo group), the dispatcher ops that
read a device value on the host or have a data-dependent shape, the Python methods that read device
memory, and torch.tensor(<host values>, device=...), attributed by Python stack to lvface or DeepSpeed.
Both curriculum stages, 1 and 2 micro-batches per step. DeepSpeed's own count is reported, not bounded.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import count_syncs  # noqa: E402

from dist_utils import run_on_ranks  # noqa: E402


def _counts(rank, world_size, group):
    os.environ.update(LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    return [{"stage": stage, "accumulation": k, **count_syncs.count(stage, k, group)}
            for stage in count_syncs.STAGES for k in (1, 2)]


@pytest.fixture(scope="module")
def counts():
    return run_on_ranks(_counts, 1, timeout=600)[0]


def test_the_counter_sees_host_reads_and_data_dependent_shapes():
    """The counter itself: each kind of sync is counted once, by owner."""
    counter = count_syncs.SyncCounter()
    x = torch.tensor([1.0, -2.0, 3.0])
    with counter.patched():
        bool(x.sum() > 0)                      # _local_scalar_dense
        x.tolist()                             # .tolist()
        x.nonzero()                            # nonzero
        torch.unique(x)                        # _unique2
        x[x > 0]                               # index[bool mask]
        torch.tensor([1, 2], device="cpu")     # torch.tensor(device=)
        x.item() if x.numel() == 1 else x[0].item()  # .item() (its _local_scalar_dense not counted twice)
        x.add(1).mul(2)                        # not a sync
    ops = [op for _, op, _ in counter.events]
    assert ops == ["_local_scalar_dense", ".tolist()", "nonzero", "_unique2", "index[bool mask]",
                   "torch.tensor(device=)", ".item()"], ops
    assert {owner for owner, _, _ in counter.events} == {"other"}  # a test's frames are nobody's


def test_one_host_sync_per_step_in_lvface(counts):
    for result in counts:
        lvface_sites = {site: n for site, n in result["sites"].items() if site.startswith("lvface")}
        assert result["lvface"] <= 1, (result["stage"], result["accumulation"], lvface_sites)
    # DeepSpeed's own syncs are its business, but a count of zero would mean the counter saw nothing
    assert all(result["deepspeed"] > 0 for result in counts), counts


def _head(sample_rate: float):
    from lvface.config import LossConfig, StageConfig
    from lvface.heads import ShardedMarginHead

    stage = StageConfig(name="s", sample_rate=sample_rate, centers="learned")
    return ShardedMarginHead(40, 8, LossConfig(stages=[stage]), group=None, seed=0)


def test_rows_left_out_of_a_full_sample_are_counted_into_the_step_flags():
    head = _head(0.1)  # a sample of int(0.1 * 40) = 4 classes
    head(torch.randn(20, 8), torch.arange(20))  # 20 positives: 16 rows lose their class
    assert head.last_sampled_rows.numel() == 4
    assert head.take_step_flags().tolist() == [0.0, 16.0]
    head(torch.randn(20, 8), torch.arange(20) % 3)  # 3 positives fit
    assert head.take_step_flags().tolist() == [0.0, 0.0]


def test_a_bad_label_after_the_first_forward_is_raised_from_the_step_flags():
    head = _head(1.0)
    with pytest.raises(ValueError, match=r"label 40 \(rank 0\) is outside \[0, 40\)"):
        head(torch.randn(2, 8), torch.tensor([0, 40]))  # the first forward checks across ranks at once
    head(torch.randn(2, 8), torch.tensor([0, 39]))
    assert head.take_step_flags().tolist() == [0.0, 0.0]
    head(torch.randn(2, 8), torch.tensor([-3, 1]))  # later forwards: on the device, no host read
    head(torch.randn(2, 8), torch.tensor([7, 1]))
    assert head.take_step_flags().tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match=r"label -3 \(rank 0\) is outside \[0, 40\)"):
        head.raise_for_bad_labels()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU")
def test_device_phase_timers_never_synchronize():
    """TrainMetrics(device_timing=True) times the phases with CUDA events and reads them without waiting:
    under torch's sync debug mode "error" any synchronising call in the timers would raise."""
    from lvface.metrics import TrainMetrics

    metrics = TrainMetrics(device=torch.device("cuda"), device_timing=True)
    x = torch.randn(2048, 2048, device="cuda", requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            with metrics.timer("backbone"):
                y = x @ x
            with metrics.timer("head"):
                loss = (y @ y).sum()
            with metrics.backward_timer(y):
                loss.backward()
            metrics.step_done()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    summary = metrics.summary()  # waits for the steps still in flight (outside the steps)
    assert summary["steps"] == 3
    assert summary["backbone_s"] > 0 and summary["head_s"] > 0
