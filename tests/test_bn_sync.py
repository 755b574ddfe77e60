"""One set of BatchNorm statistics: every rank's buffers agree before evaluation and save, so the
verification a 2-rank run reports equals `lvface eval verify` on the checkpoint written at that step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dist_utils import run_on_ranks
from run_utils import run_env
from lvface.distributed import free_port

REPO = Path(__file__).resolve().parent.parent


def _drift_then_sync(rank, world_size, group, how):
    from lvface.distributed import sync_batchnorm_buffers
    from lvface.models import build_vit

    torch.manual_seed(0)
    model = build_vit("vit_demo", embed_dim=32, depth=1).train()
    generator = torch.Generator().manual_seed(100 + rank)  # each rank its own batches: the statistics drift
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 112, 112, generator=generator) * (1 + rank))
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    sync_batchnorm_buffers(model, group, how)
    return before, {name: buffer.clone() for name, buffer in model.named_buffers()}


@pytest.mark.parametrize("how", ["average", "broadcast"])
def test_sync_makes_one_set_of_buffers(how):
    (before0, after0), (before1, after1) = run_on_ranks(_drift_then_sync, 2, how)
    floating = [name for name, value in before0.items() if value.is_floating_point()]
    assert floating and any(not torch.equal(before0[name], before1[name]) for name in floating)  # they had drifted
    for name in before0:
        assert torch.equal(after0[name], after1[name]), name
        if how == "broadcast" or name not in floating:
            expected = before0[name]
        else:  # the float64 mean of the two ranks', rounded to float32 once
            expected = ((before0[name].double() + before1[name].double()) / 2).float()
        torch.testing.assert_close(after0[name], expected, rtol=1e-6, atol=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from lvface.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("bn_sync")
    data = root / "data"
    write_synthetic_dataset(data, num_identities=24, images_per_identity=8, val_identities=20, val_pairs=200, seed=0)
    out = root / "run"
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "lvface" / "train.py"), "--ds_config", str(REPO / "configs" / "zero2.json"), "--config",
           str(REPO / "configs" / "demo.yaml"), f"data.rec={data / 'train.rec'}", "data.batch_size=16",
           f"eval.bins=[{data / 'val.bin'}]", "eval.every_steps=3", "eval.at_start=false", "train.max_steps=6",
           "checkpoint.every_steps=3", f"train.output_dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return root


def test_in_training_verification_equals_offline_eval_of_the_checkpoint(run, tmp_path):
    import pyarrow.parquet as pq

    rows = [row for row in pq.read_table(run / "run" / "metrics.parquet").to_pylist() if row.get("val_accuracy")]
    in_training = {row["step"]: row["val_accuracy"] for row in rows}
    assert sorted(in_training) == [3, 6]
    checkpoints = run / "run" / "checkpoints"
    for step, accuracy in in_training.items():
        tag = f"samples{step * 32:012d}"  # 2 ranks x 16 images a step
        report = tmp_path / f"{step}.json"
        proc = subprocess.run([sys.executable, "-m", "lvface.cli", "eval", "verify", "--checkpoint",
                               str(checkpoints / tag), "--bin", str(run / "data" / "val.bin"), "--json", str(report)],
                              cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        offline = json.loads(report.read_text())["val"]
        assert offline["accuracy"] == accuracy, (step, offline["accuracy"], accuracy)  # to the last digit
