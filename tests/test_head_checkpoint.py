"""Tests of lvface.checkpoint.head: per-rank shard files, atomic writes, resume on another world size.

Saved with 4 ranks, resumed with 2 and with 3, saved again and resumed with 4, and resharded offline:
the reassembled global W, P, Adam moments and per-row step counts are identical (bit for bit) each time.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from dist_utils import run_on_ranks

from lvface.checkpoint.head import load_head_shards, reshard_head_checkpoint, save_head_shard, shard_file_name
from lvface.config import LossConfig, OptimizerConfig
from lvface.heads import ShardedMarginHead, build_head_optimizer

NUM_CLASSES, DIM = 29, 6
KEYS = ("weight", "prototypes", "exp_avg", "exp_avg_sq", "row_steps")


def _build(group, seed):
    head = ShardedMarginHead(NUM_CLASSES, DIM, LossConfig(), group=group, seed=seed)
    return head, build_head_optimizer(head, OptimizerConfig(lr=0.01))


def _state(head, opt):
    return {
        "weight": head.weight.detach().clone(), "prototypes": head.prototypes.clone(), "exp_avg": opt.exp_avg.clone(),
        "exp_avg_sq": opt.exp_avg_sq.clone(), "row_steps": opt.row_steps.clone(), "sample_step": head.sample_step,
        "stage": head.stage.name,
    }


def train_and_save(rank, world, group, path):
    head, opt = _build(group, seed=1)
    generator = torch.Generator().manual_seed(2)
    batch = 8 // world
    for step in range(3):  # sampled early stage: moments and row steps differ from row to row
        x = torch.randn(8, DIM, generator=generator)[rank * batch : (rank + 1) * batch]
        y = torch.randint(0, NUM_CLASSES, (8,), generator=generator)[rank * batch : (rank + 1) * batch]
        opt.zero_grad()
        head(x, y).backward()
        opt.step()
        head.update_prototypes()
    head.set_stage(LossConfig().stages[1])
    save_head_shard(path, head, opt, {"step": 3, "note": "four ranks"})
    return _state(head, opt)


def load_then_save(rank, world, group, src, dst):
    head, opt = _build(group, seed=99)  # different initial values: everything must come from the files
    extra = load_head_shards(src, head, opt)
    if dst:
        save_head_shard(dst, head, opt, extra)
    return {**_state(head, opt), "extra": extra}


def _global(results):
    return {key: torch.cat([r[key] for r in results]) for key in KEYS}


def _assert_same(got, want, where):
    for key in KEYS:
        assert torch.equal(got[key], want[key]), f"{key} differs after {where}"


def test_reshard_4_to_2_and_3_and_back(tmp_path):
    saved4 = run_on_ranks(train_and_save, 4, str(tmp_path / "w4"))
    original = _global(saved4)
    assert original["row_steps"].unique().numel() > 1 and original["prototypes"].abs().sum() > 0
    assert sorted(p.name for p in (tmp_path / "w4").iterdir()) == [shard_file_name(r, 4) for r in range(4)]

    for world in (2, 3):
        loaded = run_on_ranks(load_then_save, world, str(tmp_path / "w4"), str(tmp_path / f"w{world}"))
        _assert_same(_global(loaded), original, f"4 -> {world} ranks")
        assert all(r["extra"] == {"step": 3, "note": "four ranks"} for r in loaded)
        assert all(r["stage"] == "stable" and r["sample_step"] == 3 for r in loaded)
        back = run_on_ranks(load_then_save, 4, str(tmp_path / f"w{world}"), "")
        _assert_same(_global(back), original, f"4 -> {world} -> 4 ranks")

    single = ShardedMarginHead(NUM_CLASSES, DIM, LossConfig(), group=None, seed=5)
    opt = build_head_optimizer(single, OptimizerConfig())
    load_head_shards(tmp_path / "w3", single, opt)
    _assert_same(_state(single, opt), original, "4 -> 3 -> 1 rank (no process group)")


def test_offline_reshard_command(tmp_path):
    head, opt = _build(None, seed=4)
    head(torch.randn(6, DIM), torch.tensor([0, 3, 7, 7, 28, 15])).backward()
    opt.step()
    head.update_prototypes()
    save_head_shard(tmp_path / "one", head, opt, {"epoch": 2})
    original = _state(head, opt)
    written = reshard_head_checkpoint(tmp_path / "one", tmp_path / "three", 3)
    assert [p.name for p in written] == [shard_file_name(r, 3) for r in range(3)]
    reshard_head_checkpoint(tmp_path / "three", tmp_path / "back", 1)
    restored, ropt = _build(None, seed=8)
    assert load_head_shards(tmp_path / "back", restored, ropt) == {"epoch": 2}
    _assert_same(_state(restored, ropt), original, "1 -> 3 -> 1 offline")
    with pytest.raises(FileExistsError, match="already holds head shards"):
        reshard_head_checkpoint(tmp_path / "one", tmp_path / "three", 3)
    loaded = run_on_ranks(load_then_save, 3, str(tmp_path / "three"), "")
    _assert_same(_global(loaded), original, "offline 1 -> 3, loaded on 3 ranks")


def test_refuses_mismatched_or_broken_checkpoints(tmp_path):
    head, opt = _build(None, seed=1)
    save_head_shard(tmp_path / "ok", head, opt, {})
    other = ShardedMarginHead(NUM_CLASSES + 1, DIM, LossConfig(), group=None)
    with pytest.raises(ValueError, match=r"has 29 classes but the config has 30"):
        load_head_shards(tmp_path / "ok", other)
    narrow = ShardedMarginHead(NUM_CLASSES, DIM + 2, LossConfig(), group=None)
    with pytest.raises(ValueError, match=r"embedding size 6 but the model has 8"):
        load_head_shards(tmp_path / "ok", narrow)
    # weights-only checkpoint cannot fill an optimizer
    save_head_shard(tmp_path / "no_opt", head, None, {})
    with pytest.raises(ValueError, match="no optimizer state"):
        load_head_shards(tmp_path / "no_opt", head, opt)
    load_head_shards(tmp_path / "no_opt", head)
    # incomplete set, mixed world sizes, nothing there
    reshard_head_checkpoint(tmp_path / "ok", tmp_path / "two", 2)
    (tmp_path / "two" / shard_file_name(1, 2)).unlink()
    with pytest.raises(FileNotFoundError, match=r"incomplete: shards of ranks \[1\] of 2"):
        load_head_shards(tmp_path / "two", head)
    shutil.copy(tmp_path / "ok" / shard_file_name(0, 1), tmp_path / "two" / shard_file_name(0, 1))
    with pytest.raises(ValueError, match="several world sizes"):
        load_head_shards(tmp_path / "two", head)
    with pytest.raises(FileNotFoundError, match="no head shard files"):
        load_head_shards(_empty(tmp_path), head)


def _empty(tmp_path):
    path = tmp_path / "empty"
    path.mkdir()
    return path


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    head, opt = _build(None, seed=1)
    target = tmp_path / "ckpt"
    save_head_shard(target, head, opt, {"v": 1})
    before = (target / shard_file_name(0, 1)).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lvface.files.os.replace", crash)  # the one place lvface renames files into place
    with torch.no_grad():
        head.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save_head_shard(target, head, opt, {"v": 2})
    monkeypatch.undo()
    assert (target / shard_file_name(0, 1)).read_bytes() == before  # the old shard is intact
    fresh, fopt = _build(None, seed=3)
    assert load_head_shards(target, fresh, fopt) == {"v": 1}  # the stray temporary file is ignored
