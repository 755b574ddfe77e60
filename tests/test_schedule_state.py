"""The trainer's small parts: the sample-counted schedule, TrainState's on-disk keys, the run folder."""

from __future__ import annotations

import json

import pytest

from lvface.checkpoint.state import TrainState
from lvface.config import from_dict
from lvface.run_folder import RunFolder
from lvface.schedule import Schedule


def test_schedule_counts_in_samples_of_the_reference_batch():
    cfg = from_dict({"schedule": {"warmup_steps": 10, "decay": "cosine"}})
    two_ranks = Schedule(images_per_step=128, reference_batch=128, samples_per_epoch=12800, reference_total=100)
    one_rank = Schedule(images_per_step=64, reference_batch=128, samples_per_epoch=12800, reference_total=100)
    assert (two_ranks.total_steps, one_rank.total_steps) == (100, 200)  # the same samples in all
    wide, narrow = two_ranks.lr_lambda(cfg), one_rank.lr_lambda(cfg)
    for step in (0, 5, 37, 99):  # the same samples seen: the same learning rate
        assert narrow(2 * step) == wide(step)
    assert wide(5) != wide(37)  # a schedule that moves, or the comparison above proves nothing
    assert one_rank.step_at(128 * 37) == 74 and one_rank.epoch_at(6400) == 0.5


def test_train_state_reads_the_keys_of_train_state_json():
    saved = {"step": 3, "samples_seen": 192, "epoch": 0, "position": 192, "world_size": 2, "stage": "early",
             "run_id": "abc"}  # written before reference_global_batch existed
    state = TrainState().load_state_dict(json.loads(json.dumps(saved)))
    assert state.reference_global_batch == 0  # Schedule.build: 0 = this start is the reference
    assert state.state_dict() == saved | {"reference_global_batch": 0}
    with pytest.raises(ValueError, match="samples_sen"):
        TrainState().load_state_dict({"samples_sen": 1})


def test_run_folder_writes_its_files(tmp_path):
    run = RunFolder(tmp_path / "out")
    run.write_config("model:\n  name: vit_demo\n")
    run.mark_preempted(run.checkpoints / "samples000000000064")
    assert run.config.read_text() == "model:\n  name: vit_demo\n"
    assert run.preempted.read_text() == f"{run.checkpoints / 'samples000000000064'}\n"
    run.clear_preempted()
    assert sorted(p.name for p in run.path.iterdir()) == ["config.yaml"]  # no temporary files left
