"""Nonsense config values and bad input files fail before any rank starts, with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from run_utils import run_env
from lvface.config import ConfigError, RANGES, load_config
from lvface.distributed import free_port
from lvface.preflight import check_inputs

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "configs" / "demo.yaml"


@pytest.mark.parametrize("override, key", [
    ("loss.m2=5", "loss.m2"), ("loss.m3=1.0", "loss.m3"), ("loss.m1=0", "loss.m1"), ("loss.scale=0", "loss.scale"),
    ("train.max_steps=-5", "train.max_steps"), ("train.epochs=0", "train.epochs"),
    ("optimizer.lr=-0.001", "optimizer.lr"), ("optimizer.betas=[0.9,1.5]", "optimizer.betas"),
    ("train.log_every=0", "train.log_every"), ("eval.batch_size=0", "eval.batch_size"),
    ("data.crop_p=1.5", "data.crop_p"), ("checkpoint.keep_last=-1", "checkpoint.keep_last"),
    ("schedule.min_lr_ratio=2", "schedule.min_lr_ratio"), ("metrics.prometheus_port=70000", "metrics.prometheus_port"),
])
def test_out_of_range_values_name_their_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}' is"):
        load_config(DEMO, [override])


def test_every_shipped_config_and_the_defaults_are_in_range():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        load_config(path)
    load_config(None)
    # the table names real keys only (a renamed field must not leave a check that never runs)
    cfg = load_config(None)
    for section, table in RANGES.items():
        for key in table:
            assert hasattr(getattr(cfg, section), key), f"{section}.{key}"


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from lvface.data.synthetic import write_synthetic_dataset

    out = tmp_path_factory.mktemp("ranges") / "data"
    write_synthetic_dataset(out, num_identities=10, images_per_identity=2, val_identities=4, val_pairs=8, seed=0)
    return out


def test_input_files_are_checked_by_their_headers(data, tmp_path):
    good = load_config(DEMO, [f"data.rec={data / 'train.rec'}", f"eval.bins=[{data / 'val.bin'}]"])
    check_inputs(good, REPO / "configs" / "zero2.json")
    # a .rec whose .idx is missing; a .rec that is not RecordIO; a .bin that is not a pickle
    lonely = tmp_path / "lonely.rec"
    lonely.write_bytes((data / "train.rec").read_bytes())
    with pytest.raises(ConfigError, match=r"lonely.idx not found"):
        check_inputs(load_config(DEMO, [f"data.rec={lonely}", "eval.bins=[]"]))
    fake = tmp_path / "fake.rec"
    fake.write_bytes(b"JFIF" * 64)
    (tmp_path / "fake.idx").write_text((data / "train.idx").read_text())
    with pytest.raises(ConfigError, match=r"no RecordIO record at offset"):
        check_inputs(load_config(DEMO, [f"data.rec={fake}", "eval.bins=[]"]))
    with pytest.raises(ConfigError, match=r"eval.bins: .*train.idx is not an insightface verification .bin"):
        check_inputs(load_config(DEMO, [f"data.rec={data / 'train.rec'}", f"eval.bins=[{data / 'train.idx'}]"]))
    with pytest.raises(ConfigError, match=r"checkpoint.resume=.*nowhere not found"):
        check_inputs(load_config(DEMO, [f"data.rec={data / 'train.rec'}", "eval.bins=[]",
                                          f"checkpoint.resume={tmp_path / 'nowhere'}"]))


def test_two_ranks_report_a_bad_path_once_before_distributed_init(data, tmp_path):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "lvface" / "train.py"), "--ds_config", str(REPO / "configs" / "zero2.json"), "--config",
           str(DEMO), f"data.rec={data / 'train.rec'}", f"eval.bins=[{tmp_path / 'lfw.bin'}]",
           f"train.output_dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-3000:]
    assert text.count("lvface: error: eval.bins: verification set") == 1, text[-3000:]
    # raised before the process group: nothing of the run after init (the data line) was logged
    assert "optimizer steps per epoch" not in text and "Traceback" not in text, text[-3000:]
    assert not (tmp_path / "run").exists()
