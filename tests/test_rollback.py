"""Roll back and re-train (issue 17): resuming a checkpoint older than the run's newest sets the later
ones aside, so the re-trained states are written under their names, `latest` names them, and the next
resume (one rank: through a universal conversion) loads the re-trained weights, not the abandoned
branch's nor its cached conversion.

Real processes: a 2-rank run of 6 steps (checkpoints at samples 64, 128, 192), the same folder rolled
back to samples 64 by 2 ranks with another seed and learning rate, then one process resuming it."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_utils import run_env, tiny_data, tiny_overrides
from lvface.checkpoint.files import BACKBONE_FILE, LATEST, read_latest
from lvface.checkpoint.manifest import MANIFEST, check_files, manifest_digest, manifest_text
from lvface.distributed import free_port
from lvface.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent
TAGS = [f"samples{n:012d}" for n in (64, 128, 192)]


def _train(out: Path, ranks: int, *extra: str) -> subprocess.CompletedProcess:
    launch = ["-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port", str(free_port())]
    cmd = [sys.executable, *(launch if ranks > 1 else []), "-m", "lvface.train",
           "--config", str(REPO / "configs" / "demo.yaml"),
           *tiny_overrides(tiny_data(), **{"train.output_dir": str(out), "checkpoint.every_steps": "2",
                                           "checkpoint.keep_last": "0"}), *extra]
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)


def _tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("samples"))


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """The backbone and the head's rows (all shards, in class order) of a checkpoint."""
    tensors = {f"backbone.{k}": v for k, v in
               torch.load(folder / BACKBONE_FILE, map_location="cpu", weights_only=True).items()}
    shards = [torch.load(path, map_location="cpu", weights_only=True) for path in sorted(folder.glob("head_shard_*"))]
    for key in ("weight", "prototypes", "exp_avg", "exp_avg_sq"):
        tensors[f"head.{key}"] = torch.cat([shard[key] for shard in shards])
    return tensors


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rollback") / "run"
    root = RunFolder(out).checkpoints
    first = _train(out, 2)
    assert first.returncode == 0, first.stderr[-4000:]
    assert _tags(root) == TAGS and read_latest(root) == TAGS[-1]
    old = {tag: manifest_digest(root / tag) for tag in TAGS}
    old_weights = _weights(root / TAGS[-1])
    # the old branch's universal conversion of its newest checkpoint, under its exact key: were it used,
    # DeepSpeed would find no files in it and the one-rank resume below would fail
    stale = root / "universal" / f"{TAGS[-1]}-{old[TAGS[-1]][:16]}" / TAGS[-1] / "zero"
    stale.mkdir(parents=True)
    second = _train(out, 2, f"checkpoint.resume={root / TAGS[0]}", "train.seed=7", "optimizer.lr=0.002")
    assert second.returncode == 0, second.stderr[-4000:]
    third_out = out.parent / "next"
    third = _train(third_out, 1, f"checkpoint.resume={root}", "train.max_steps=6")
    assert third.returncode == 0, third.stderr[-4000:]
    return {"out": out, "root": root, "old": old, "old_weights": old_weights, "second": second.stderr,
            "third": third.stderr, "third_root": RunFolder(third_out).checkpoints}


def test_the_abandoned_checkpoints_are_set_aside_untouched_with_one_warning(rolled_back):
    root, old = rolled_back["root"], rolled_back["old"]
    asides = sorted(root.glob("abandoned-*"))
    assert len(asides) == 1, asides
    aside = asides[0]
    warnings = [line for line in rolled_back["second"].splitlines() if "moved the later ones" in line]
    assert len(warnings) == 1 and str(aside) in warnings[0] and "WARNING" in warnings[0], warnings
    assert _tags(aside) == TAGS[1:]  # the later ones, kept byte for byte
    for tag in TAGS[1:]:
        assert check_files(aside / tag) == [] and manifest_digest(aside / tag) == old[tag]
    assert read_latest(aside) == TAGS[-1]  # a checkpoints folder of the abandoned branch: resumable
    assert [p.name for p in (aside / "universal").iterdir()] == [f"{TAGS[-1]}-{old[TAGS[-1]][:16]}"]


def test_the_retrained_states_are_written_and_latest_names_them(rolled_back):
    root, old = rolled_back["root"], rolled_back["old"]
    assert "not written again" not in rolled_back["second"]
    assert _tags(root) == TAGS and read_latest(root) == TAGS[-1]
    assert manifest_digest(root / TAGS[0]) == old[TAGS[0]]  # the one resumed from is kept
    for tag in TAGS[1:]:
        assert check_files(root / tag) == [] and manifest_digest(root / tag) != old[tag]
    assert not any((root / "universal").glob(f"{TAGS[-1]}-{old[TAGS[-1]][:16]}"))


def test_the_next_one_rank_resume_loads_the_retrained_weights(rolled_back):
    root, third_root = rolled_back["root"], rolled_back["third_root"]
    assert "resuming a 2-rank checkpoint on 1 ranks" in rolled_back["third"]
    assert f"resumed from {root / TAGS[-1]}" in rolled_back["third"]
    # converted afresh, under the re-trained checkpoint's digest
    assert (root / "universal" / f"{TAGS[-1]}-{manifest_digest(root / TAGS[-1])[:16]}" / TAGS[-1] / "zero").is_dir()
    # no step on one rank (max_steps reached): its final checkpoint holds exactly what it loaded
    loaded, retrained = _weights(third_root / TAGS[-1]), _weights(root / TAGS[-1])
    abandoned = rolled_back["old_weights"]
    assert loaded.keys() == retrained.keys()
    for key in loaded:
        assert torch.equal(loaded[key], retrained[key]), key
    assert not torch.equal(loaded["backbone.feature.3.weight"], abandoned["backbone.feature.3.weight"])
    assert not torch.equal(loaded["head.weight"], abandoned["head.weight"])


def test_set_aside_moves_conversions_and_leftovers_and_repoints_latest(tmp_path, caplog):
    from lvface.checkpoint.manager import set_aside_later, tag_for

    root = tmp_path / "checkpoints"
    for samples in (32, 64, 96):
        (root / tag_for(samples)).mkdir(parents=True)
        (root / tag_for(samples) / MANIFEST).write_text(manifest_text({}, {"run_id": "r"}))
    (root / "universal" / f"{tag_for(96)}-0123456789abcdef").mkdir(parents=True)
    (root / "universal" / f"{tag_for(32)}-0123456789abcdef").mkdir(parents=True)
    (root / f".{tag_for(128)}.partial-r").mkdir()  # a later save that crashed: its tag folder never appeared
    (root / f".{tag_for(96)}.partial-r").mkdir()
    (root / LATEST).write_text(tag_for(96))
    elsewhere = tmp_path / "other" / tag_for(48)
    with caplog.at_level(logging.WARNING, logger="lvface.checkpoint.manager"):
        aside = set_aside_later(root, 48, elsewhere, rank=0, world_size=1, group=None)
    assert caplog.text.count("moved the later ones") == 1 and str(aside) in caplog.text
    assert sorted(p.name for p in aside.iterdir()) == [f".{tag_for(96)}.partial-r", LATEST, tag_for(64), tag_for(96),
                                                       "universal"]
    assert [p.name for p in (aside / "universal").iterdir()] == [f"{tag_for(96)}-0123456789abcdef"]
    assert read_latest(aside) == tag_for(96)
    assert _tags(root) == [tag_for(32)] and read_latest(root) == tag_for(32)  # resumed from elsewhere: the newest left
    assert [p.name for p in (root / "universal").iterdir()] == [f"{tag_for(32)}-0123456789abcdef"]
    assert set_aside_later(root, 48, elsewhere, rank=0, world_size=1, group=None) is None  # nothing later
    again = set_aside_later(root, 0, elsewhere, rank=0, world_size=1, group=None)  # within the same second
    assert again != aside and _tags(again) == [tag_for(32)] and not (root / LATEST).exists()
