"""TensorBoard and CSV scalars of a real run, read back and checked against the run's Parquet log."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from run_utils import run_env
from lvface.config import ConfigError, load_config
from lvface.tracking import CSV_FILE, TENSORBOARD_DIR, check_tracking

REPO = Path(__file__).resolve().parent.parent
TRAIN_TAGS = {"train/loss", "train/lr", "train/stage", "train/epoch", "train/images_per_s", "train/grad_norm",
              "train/skipped_steps", "train/bad_records"}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    from lvface.data.synthetic import write_synthetic_dataset

    root = tmp_path_factory.mktemp("tracking")
    data = root / "data"
    write_synthetic_dataset(data, num_identities=24, images_per_identity=8, val_identities=10, val_pairs=40, seed=0)
    out = root / "run"
    cmd = [sys.executable, "-m", "lvface.train", "--config", str(REPO / "configs" / "demo.yaml"),
           f"data.rec={data / 'train.rec'}", "data.batch_size=16", f"eval.bins=[{data / 'val.bin'}]",
           "eval.every_steps=2", "eval.batch_size=40", "train.log_every=1", "train.max_steps=5",
           f"train.output_dir={out}", "metrics.csv=true", "loss.stages=[{end_epoch: 0.4, sample_rate: 0.5}, "
           "{name: stable, end_epoch: 3, centers: both}]"]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def _events(out: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(out / TENSORBOARD_DIR))
    accumulator.Reload()
    return {tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
            for tag in accumulator.Tags()["scalars"]}


def test_tensorboard_holds_lvface_scalars_equal_to_the_parquet_log(run):
    import pyarrow.parquet as pq

    events = _events(run)
    assert set(events) == TRAIN_TAGS | {"verification/val/accuracy", "verification/val/accuracy_std"}
    table = pq.read_table(run / "metrics.parquet").to_pylist()
    logged = [row for row in table if row.get("loss") is not None]
    assert [step for step, _ in events["train/loss"]] == [row["step"] for row in logged] == [1, 2, 3, 4, 5]
    for tag, column in (("train/loss", "loss"), ("train/lr", "lr"), ("train/epoch", "epoch"),
                        ("train/images_per_s", "images_per_s")):
        # TensorBoard keeps float32
        assert [value for _, value in events[tag]] == [float(np.float32(row[column])) for row in logged], tag
    assert all(value == 0 for _, value in events["train/skipped_steps"])
    # the curriculum's switch from stage 0 to stage 1 at epoch 0.4 (24 x 8 images, 16 a step: 0.083 epoch a step)
    stages = [value for _, value in events["train/stage"]]
    assert stages[0] == 0 and stages[-1] == 1 and sorted(stages) == stages
    accuracy = [row for row in table if row.get("val_accuracy") is not None]
    assert events["verification/val/accuracy"] == [(row["step"], float(np.float32(row["val_accuracy"])))
                                                   for row in accuracy]
    assert [step for step, _ in events["verification/val/accuracy"]] == [0, 2, 4, 5]


def test_csv_holds_the_same_scalars(run):
    events = _events(run)
    with open(run / CSV_FILE, newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["step", "tag", "value"]
    from_csv: dict[str, list[tuple[int, float]]] = {}
    for step, tag, value in rows[1:]:
        from_csv.setdefault(tag, []).append((int(step), float(value)))
    assert set(from_csv) == set(events)
    for tag, values in from_csv.items():
        assert [(step, float(np.float32(value))) for step, value in values] == events[tag], tag


def test_a_tracker_whose_package_is_missing_fails_before_training():
    cfg = load_config(None, ["metrics.wandb=true"])
    if importlib.util.find_spec("wandb") is not None:
        check_tracking(cfg.metrics)  # installed: nothing to report
        return
    with pytest.raises(ConfigError, match=r"'metrics.wandb' is true but wandb is not installed: pip install wandb"):
        check_tracking(cfg.metrics)
