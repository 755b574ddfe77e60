"""A checkpoint holding NaN or Inf is damaged on resume, as on save (issue 17): resume falls back to the
newest finite checkpoint, the same path a manifest mismatch takes, with a warning naming the file and
the tensor. The NaN is written into real checkpoints of a real one-process run and the manifest is
re-signed, so that only the tensor check can catch it."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from run_utils import run_env, tiny_data, tiny_overrides
from lvface.checkpoint.files import BACKBONE_FILE, read_latest
from lvface.checkpoint.manifest import (MANIFEST, CheckpointCorrupt, check_files, checkpoint_files, describe_files,
                                        manifest_text, read_manifest)
from lvface.run_folder import RunFolder

REPO = Path(__file__).resolve().parent.parent
SHARD = "head_shard_00000_of_00001.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"


def _train(out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lvface.train", "--config", str(REPO / "configs" / "demo.yaml"),
           *tiny_overrides(tiny_data(), **{"train.output_dir": str(out), "checkpoint.every_steps": "2",
                                           "checkpoint.keep_last": "0"}), *extra]
    return subprocess.run(cmd, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=600)


def _resign(folder: Path) -> None:
    """Rewrite the manifest over the files as they are now: the SHA-256 check passes."""
    manifest = read_manifest(folder)
    info = {key: value for key, value in manifest.items() if key not in ("format", "algorithm", "files")}
    (folder / MANIFEST).write_text(manifest_text(describe_files(folder, checkpoint_files(folder)), info))
    assert check_files(folder) == []


def _tags(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("samples"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """6 one-process steps of 16 samples, a checkpoint every 2 (samples 32, 64, 96), all kept."""
    out = tmp_path_factory.mktemp("nan") / "run"
    proc = _train(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert _tags(RunFolder(out).checkpoints) == [f"samples{n:012d}" for n in (32, 64, 96)]
    return out


def test_nan_head_shard_falls_back_to_the_newest_finite_checkpoint(run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run, out)
    root = RunFolder(out).checkpoints
    newest, previous = _tags(root)[-1], _tags(root)[-2]
    pristine = {name: torch.load(root / newest / name, map_location="cpu", weights_only=True)
                for name in (SHARD, BACKBONE_FILE)}
    shard = torch.load(root / newest / SHARD, map_location="cpu", weights_only=True)
    shard["weight"][3, 5] = float("nan")
    torch.save(shard, root / newest / SHARD)
    _resign(root / newest)

    proc = _train(out, "checkpoint.resume=auto")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{root / newest / SHARD} holds non-finite values (NaN/Inf) in weight" in proc.stderr, proc.stderr[-4000:]
    assert f"resuming from {root / previous}, the newest intact checkpoint" in proc.stderr
    # the NaN checkpoint is set aside (kept, as it was), the re-trained one takes its name
    asides = sorted(root.glob("abandoned-*"))
    assert len(asides) == 1 and _tags(asides[0]) == [newest] and check_files(asides[0] / newest) == []
    assert read_latest(root) == newest and check_files(root / newest) == []
    retrained = {name: torch.load(root / newest / name, map_location="cpu", weights_only=True)
                 for name in (SHARD, BACKBONE_FILE)}
    assert torch.isfinite(retrained[SHARD]["weight"]).all()
    # an exact resume: the two re-trained steps reproduce the state the poisoned file had before
    for key in ("weight", "prototypes", "exp_avg", "exp_avg_sq", "row_steps"):
        assert torch.equal(retrained[SHARD][key], pristine[SHARD][key]), key
    for key, value in pristine[BACKBONE_FILE].items():
        assert torch.equal(retrained[BACKBONE_FILE][key], value), key


def test_inf_in_deepspeed_model_states_is_named_and_an_explicit_tag_refused(run, tmp_path, caplog):
    from lvface.checkpoint.manager import resume_candidates, select_checkpoint

    out = tmp_path / "run"
    shutil.copytree(RunFolder(run).checkpoints, RunFolder(out).checkpoints)
    root = RunFolder(out).checkpoints
    newest, previous = _tags(root)[-1], _tags(root)[-2]
    states = torch.load(root / newest / MODEL_STATES, map_location="cpu", weights_only=False)
    states["module"]["blocks.1.mlp.fc1.weight"][0, 0] = float("-inf")
    torch.save(states, root / newest / MODEL_STATES)
    _resign(root / newest)

    with caplog.at_level(logging.WARNING, logger="lvface.checkpoint.manager"):
        chosen = select_checkpoint(*resume_candidates("auto", out), rank=0, world_size=1, group=None)
    assert chosen == (root, previous)
    assert f"{root / newest / MODEL_STATES} holds non-finite values (NaN/Inf) in module.blocks.1.mlp.fc1.weight" \
        in caplog.text
    with pytest.raises(CheckpointCorrupt, match=r"module\.blocks\.1\.mlp\.fc1\.weight"):
        select_checkpoint(*resume_candidates(str(root / newest), out), rank=0, world_size=1, group=None)
    assert select_checkpoint(*resume_candidates(str(root / previous), out), rank=0, world_size=1,
                             group=None) == (root, previous)  # the finite ones pass
