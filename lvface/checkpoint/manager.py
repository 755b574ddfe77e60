"""Save and resume training: the DeepSpeed engine's shards, the head, the config, a plain backbone.

A checkpoint is the folder `<output_dir>/checkpoints/samples<N>/`, named by the samples the run had
seen (N, 12 digits), so that checkpoints of runs on different world sizes cannot collide. Nothing is
ever written into an existing checkpoint folder: a save writes `.samples<N>.partial-<run>/`, each file
hashed as it is written and fsynced (lvface/checkpoint/writer.py); once every rank is done, rank 0
writes `manifest.json` (lvface/checkpoint/manifest.py), renames the folder into place, fsyncs it and
its parent, and only then moves the `latest` pointer (durably) and prunes. A crash, a killed writer or
a failed write mid-save leaves the previous checkpoint and `latest` as they were; resume checks every
file against the manifest and every tensor for NaN/Inf, and falls back to the newest checkpoint that
is intact and finite, naming the damaged file or tensor.

With `checkpoint.async_save` (the default) the step boundary waits only for the snapshot; each rank's
writer process writes its files in the background and rank 0's commits them. That the writers are
done is agreed by a two-value all-reduce at each step boundary while a save is in flight (in
`Checkpointer.save`, which the trainer calls after every step), not inside `train_step`. One save is
in flight at a time: a save that falls due earlier waits (logged); a forced save (the end, a
preemption) returns only once committed.

Resuming a checkpoint older than the run folder's newest (a rollback: the usual answer to a loss
spike, re-trained with another seed or learning rate) sets the later checkpoints aside, never deleting
them: rank 0 moves them, with their universal conversions and a copy of `latest`, into
`checkpoints/abandoned-<UTC time>/` (itself a checkpoints folder that `checkpoint.resume` accepts),
so the re-trained run writes its own states under those names and `latest` names them.

Contents of a tag folder:
- DeepSpeed's own files (model states, ZeRO-partitioned optimizer states, the LR scheduler), and its
  recovery scripts `zero_to_fp32.py` / `zero_to_torch.py` (which DeepSpeed itself drops beside the tags,
  outside any manifest);
- `head_shard_<rank>_of_<world>.pt`, one per rank: this rank's rows of the class centers W, the EPL
  prototypes P and the head optimizer's moments (lvface/checkpoint/head.py), re-split on load when
  the world size changed;
- `config.yaml` (the resolved lvface config) and `train_state.json` (samples seen, epoch, position,
  world size, run id);
- `backbone.pt`: a plain fp32 state_dict with insightface arcface_torch key names, ready for
  `load_state_dict(strict=True)`, evaluation and ONNX export; under bf16/fp16 the optimizer's fp32
  master weights (`master_state_dict`), not the working copy cast up;
- `manifest.json`: every file's size and SHA-256, the run id and the samples seen.

`Checkpointer` is the trainer's one checkpoint object: which checkpoint to resume (verified, falling
back to the newest intact one) and loading it; when to save (the interval, or forced at the end and on
preemption); and which old checkpoints to remove: only this run's own, by samples seen, never the one
just written.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from lvface.checkpoint.files import BACKBONE_FILE, CONFIG_FILE, LATEST, TRAIN_STATE_FILE, load_backbone_into, read_latest
from lvface.checkpoint.head import load_head_shards, shard_file_name, shard_payload
from lvface.checkpoint.manifest import (MANIFEST, CheckpointCorrupt, check_files, manifest_digest, manifest_text,
                                        read_manifest)
from lvface.checkpoint.state import TrainState
from lvface.checkpoint.writer import (BufferPool, Capture, Writer, WriterDied, describe_error, nonfinite_problem,
                                     write_files)
from lvface.config import CheckpointConfig, ConfigError
from lvface.engine import zero_stage
from lvface.files import atomic_write_text, fsync_dir, json_text
from lvface.progress import run_with_progress
from lvface.run_folder import RunFolder

log = logging.getLogger(__name__)

TAG_PATTERN = re.compile(r"^samples(\d{12})$")
ABANDONED_PREFIX = "abandoned-"
"""Folders under checkpoints/ holding the checkpoints a rollback set aside (no tag pattern: resume and
keep_last never see them)."""
UNIVERSAL = "universal"
"""The folder under checkpoints/ caching universal conversions, `<tag>-<manifest digest>/<tag>`."""


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, permission, ...): the message names the path and the reason; the
    previous checkpoint and `latest` are untouched."""


def tag_for(samples_seen: int) -> str:
    return f"samples{samples_seen:012d}"


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


@contextmanager
def gathered_parameters(module: torch.nn.Module, stage: int):
    """Full parameters on every rank for the duration (a no-op below ZeRO-3)."""
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


def plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state_dict on the CPU with floating tensors in fp32."""
    return {
        key: (value.detach().float() if value.is_floating_point() else value.detach()).cpu().clone()
        for key, value in module.state_dict().items()
    }


def _masters_collective(engine, stage: int) -> bool:
    """Whether `master_state_dict` communicates (every rank must then call it)."""
    return engine.bfloat16_enabled() or engine.fp16_enabled() or stage == 3


def master_state_dict(engine, stage: int) -> dict[str, torch.Tensor]:
    """The backbone's state_dict on the CPU in fp32, with every trained parameter taken from the
    optimizer's fp32 master copy, not the module's bf16/fp16 working copy cast up (which would round
    every weight to 8 mantissa bits). Buffers (BatchNorm statistics) come from the module.

    Collective under ZeRO (every rank must call it, in the same order): deepspeed's
    safe_get_full_fp32_param reassembles each parameter from the ranks' fp32 partitions (ZeRO-1/2:
    all-reduce; ZeRO-3: all-gather). In fp32 below ZeRO-3 the module's parameters are the master
    weights and nothing is communicated.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    masters = {}
    if _masters_collective(engine, stage):
        for name, param in module.named_parameters():
            master = safe_get_full_fp32_param(param)  # None for a parameter the optimizer does not hold
            if master is not None:
                masters[name] = master.detach().float().cpu().clone()
    with gathered_parameters(module, stage):  # the rest (buffers, untrained parameters) from the module
        state = plain_state_dict(module)
    for name, master in masters.items():
        if master.shape != state[name].shape:
            raise RuntimeError(f"master weight of {name} has shape {tuple(master.shape)}, the module's "
                               f"{tuple(state[name].shape)}: DeepSpeed's fp32 partitions do not match the module")
        state[name] = master
    return state


def list_tags(root: Path) -> list[str]:
    """Checkpoint tags under `root` (complete or not), oldest first by samples seen."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name)),
                  key=lambda name: int(TAG_PATTERN.match(name).group(1)))


def run_of(folder: Path) -> str | None:
    """The run id recorded in a checkpoint's manifest (None when unreadable)."""
    try:
        return read_manifest(folder).get("run_id")
    except CheckpointCorrupt:
        return None


def _gather(mine, group, world_size: int) -> list:
    """Every rank's `mine` (any picklable value), in rank order, on every rank; also a barrier."""
    if world_size == 1:
        return [mine]
    parts: list = [None] * world_size
    dist.all_gather_object(parts, mine, group=group)
    return parts


def _collective_device(group) -> torch.device:
    """Where a small tensor for a collective on `group` lives (NCCL takes only the current GPU's)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _agree(error: str | None, group, world_size: int) -> list[str]:
    """Every rank's error (None = fine) on every rank; also a barrier. One one-element all-reduce when
    every rank is fine (the messages are gathered only when one is not): it is in every save's stall."""
    if world_size == 1:
        return [error] if error else []
    flag = torch.tensor([float(error is not None)], device=_collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return []
    return [e for e in _gather(error, group, world_size) if e]


def _nonfinite_tensors(named: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors holding a NaN or an infinity, with one host sync: each tensor's sum
    is reduced where the tensor lives (any NaN or infinity makes it non-finite), and only a tensor whose
    sum is not finite (also finite values overflowing it) is scanned element by element."""
    floating = [(name, t.detach()) for name, t in named.items()
                if t is not None and t.is_floating_point() and t.numel()]
    if not floating:
        return []
    device = floating[0][1].device
    sums = torch.stack([t.sum(dtype=torch.float32).to(device) for _, t in floating])
    suspects = [pair for pair, finite in zip(floating, torch.isfinite(sums).tolist()) if not finite]
    return [name for name, t in suspects if not bool(torch.isfinite(t).all())]


def _refuse_nonfinite(folder: Path, engine, head, zero_stage: int, rank: int, world_size: int, group) -> None:
    """A checkpoint never holds non-finite values: refuse before anything is written (the synchronous
    path; a background save's writer checks its copy). Collective."""
    named = {"head.weight": head.weight, "head.prototypes": head.prototypes}
    if zero_stage < 3:
        named.update({f"backbone.{k}": v for k, v in engine.module.state_dict().items()})
    bad = _nonfinite_tensors(named)
    errors = _agree(f"rank {rank}: non-finite values in {', '.join(bad[:5])}" if bad else None, group, world_size)
    if errors:
        raise CheckpointSaveError(f"not saving {folder}: {'; '.join(errors)}")


_CAPTURE_ENGINE = None


def _capture_engine_class():
    """A DeepSpeed CheckpointEngine whose save() captures the state dict into the snapshot instead of
    writing it; loading stays with DeepSpeed's own engine (built lazily: DeepSpeed is imported on use)."""
    global _CAPTURE_ENGINE
    if _CAPTURE_ENGINE is None:
        from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

        class CaptureEngine(CheckpointEngine):
            def __init__(self, inner, capture: Capture, staging: Path):
                super().__init__()
                self.name, self.inner, self.capture, self.staging = "lvface-capture", inner, capture, staging

            def create(self, info):
                pass

            def makedirs(self, path, exist_ok=False):
                pass  # the writer creates the folders it writes into

            def save(self, state_dict, path: str):
                self.capture.add_torch(os.path.relpath(path, self.staging), state_dict,
                                       zipfile=getattr(self.inner, "zipfile_serialization", True))

            def load(self, path: str, map_location=None):
                return self.inner.load(path, map_location=map_location)

            def commit(self, info):
                return True

        _CAPTURE_ENGINE = CaptureEngine
    return _CAPTURE_ENGINE


@contextmanager
def _capturing(engine, capture: Capture, staging: Path):
    """DeepSpeed's save_checkpoint captures into `capture` for the duration. Its recovery scripts
    (zero_to_fp32.py), which DeepSpeed copies into the folder above the tag, go into the tag folder
    instead, where the manifest covers them."""
    inner = engine.checkpoint_engine
    engine.checkpoint_engine = _capture_engine_class()(inner, capture, staging)

    def copy_recovery_script(save_path):
        import deepspeed.utils

        for script in ("zero_to_fp32.py", "zero_to_torch.py"):
            source = Path(deepspeed.utils.__file__).parent / script
            if source.is_file():
                capture.add_copy(script, str(source))

    engine._copy_recovery_script = copy_recovery_script
    try:
        yield
    finally:
        engine.checkpoint_engine = inner
        del engine._copy_recovery_script  # the class's method again


def capture_checkpoint(capture: Capture, root: Path, staging: Path, *, engine, head, head_optimizer, config_yaml: str,
                       train_state: dict, zero_stage: int, rank: int) -> None:
    """Every file of this rank's part of the checkpoint into `capture` (DeepSpeed's through its
    checkpoint engine, this rank's head shard; the last rank the plain backbone, config and train state:
    rank 0 already captures DeepSpeed's model states, and the step waits for the slowest rank).
    Collective (DeepSpeed's save and, in bf16/fp16 or under ZeRO-3, the master weights)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    # The (empty) universal-checkpoint info lets DeepSpeed's ds_to_universal convert this checkpoint
    # when it is resumed on another world size: a pure data-parallel backbone needs no patterns.
    client_state = {"lvface": train_state, UNIVERSAL_CHECKPOINT_INFO: {}}
    with capture.phase("deepspeed_s"), _capturing(engine, capture, staging):
        engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)
    with capture.phase("backbone_s"):
        writes_backbone = rank == head.world_size - 1
        if writes_backbone or _masters_collective(engine, zero_stage):
            backbone = master_state_dict(engine, zero_stage)  # every rank takes part when it is collective
        if writes_backbone:
            capture.add_torch(BACKBONE_FILE, backbone)
            capture.add_bytes(CONFIG_FILE, config_yaml.encode())
            capture.add_bytes(TRAIN_STATE_FILE, json_text(train_state).encode())
    with capture.phase("head_s"):
        capture.add_torch(shard_file_name(head.rank, head.world_size),
                          shard_payload(head, head_optimizer, {"samples_seen": train_state["samples_seen"]}))
        capture.finish()


def commit_checkpoint(root: str, tag: str, staging: str, files: dict, info: dict, keep_last: int) -> list[str]:
    """Rank 0's commit, once every rank's files are written and fsynced: the manifest (durable), the
    staging folder renamed to `tag`, the folder and its parent fsynced, then `latest` (durable); only
    then this run's older checkpoints are pruned. Returns the pruned tags. Runs in rank 0's writer
    process (or inline on the synchronous path)."""
    root_path, staging_path = Path(root), Path(staging)
    atomic_write_text(staging_path / MANIFEST, manifest_text(files, info), durable=True)
    os.replace(staging_path, root_path / tag)
    fsync_dir(root_path / tag)
    fsync_dir(root_path)
    atomic_write_text(root_path / LATEST, tag, durable=True)
    return prune_checkpoints(root_path, keep_last, info["run_id"], keep=tag)


def refuse_existing(folder: Path, run_id: str) -> None:
    """Refuse a save into an existing checkpoint folder. (The one a save may legitimately meet, the
    checkpoint this process resumed from with no step since, is skipped before: Checkpointer.save.)"""
    if folder.exists():  # a resume sets later checkpoints aside: another run or process wrote this one
        raise CheckpointSaveError(f"{folder} exists and is not the checkpoint this run ({run_id}) resumed from: "
                                  f"lvface never writes into an existing checkpoint folder; choose another "
                                  f"train.output_dir")


def staging_folder(root: Path, tag: str, run_id: str) -> Path:
    """Where this run writes checkpoint `tag` before the commit renames it."""
    return root / f".{tag}.partial-{run_id}"


def _remove_own_staging(root: Path, run_id: str) -> list[str]:
    """Staging folders a crashed process of this run left (a save killed before its commit)."""
    removed = []
    for path in root.glob(f".samples*.partial-{run_id}") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


def _begin_save(root: Path, tag: str, *, engine, head, zero_stage: int, train_state: dict, rank: int,
                world_size: int, group) -> Path:
    """The staging folder of a save of `tag` (write_files creates it), after the non-finite check.
    A crashed process's staging folder is removed by Checkpointer.load(). Collective."""
    refuse_existing(root / tag, train_state["run_id"])
    _refuse_nonfinite(root / tag, engine, head, zero_stage, rank, world_size, group)
    return staging_folder(root, tag, train_state["run_id"])


def _capture_or_error(capture: Capture, root: Path, staging: Path, rank: int, **objects) -> str | None:
    try:
        capture_checkpoint(capture, root, staging, rank=rank, **objects)
    except (OSError, RuntimeError) as exc:
        return f"rank {rank}: {describe_error(exc, staging)}"
    return None


def _save_failed(root: Path, tag: str, staging: Path, errors: list[str], rank: int) -> CheckpointSaveError:
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    return CheckpointSaveError(f"saving checkpoint {root / tag} failed: {'; '.join(errors)}; the previous "
                               f"checkpoint and {root / LATEST} are unchanged")


def _manifest_info(tag: str, train_state: dict, world_size: int) -> dict:
    return {"run_id": train_state["run_id"], "tag": tag, "samples_seen": train_state["samples_seen"],
            "world_size": world_size}


def save_checkpoint(root: Path, tag: str, *, engine, head, head_optimizer, config_yaml: str, train_state: dict,
                    zero_stage: int, rank: int, world_size: int, group, keep_last: int = 0) -> Path:
    """Write checkpoint `tag` synchronously on every rank (see the module docstring): each file hashed as
    it is written and fsynced, then rank 0's commit; returns its folder. Collective."""
    staging = _begin_save(root, tag, engine=engine, head=head, zero_stage=zero_stage, train_state=train_state,
                          rank=rank, world_size=world_size, group=group)
    capture, files = Capture(pool=None), {}
    error = _capture_or_error(capture, root, staging, rank, engine=engine, head=head, head_optimizer=head_optimizer,
                              config_yaml=config_yaml, train_state=train_state, zero_stage=zero_stage)
    if error is None:
        try:
            files = write_files(str(staging), capture.jobs, capture.storages)
        except OSError as exc:
            error = f"rank {rank}: {describe_error(exc, staging)}"
    errors = _agree(error, group, world_size)
    if not errors:
        files = {k: v for part in _gather(files, group, world_size) for k, v in part.items()}
        error, removed = None, []
        if rank == 0:
            try:
                removed = commit_checkpoint(str(root), tag, str(staging), files,
                                            _manifest_info(tag, train_state, world_size), keep_last)
            except OSError as exc:
                error = f"rank 0: {describe_error(exc, staging)}"
        errors = _agree(error, group, world_size)
    if errors:
        raise _save_failed(root, tag, staging, errors, rank)
    log.info("checkpoint %s written%s", root / tag, f"; removed older checkpoints of this run: {', '.join(removed)}"
             if rank == 0 and removed else "")
    return root / tag


def prune_checkpoints(root: Path, keep_last: int, run_id: str, keep: str) -> list[str]:
    """Remove this run's checkpoints beyond the newest `keep_last` (by samples seen), never `keep`
    (the one just written) nor another run's. Returns the removed tags."""
    if keep_last <= 0:
        return []
    own = [tag for tag in list_tags(root) if run_of(root / tag) == run_id]
    removed = []
    for tag in own[:-keep_last]:
        if tag != keep:
            shutil.rmtree(root / tag, ignore_errors=True)
            removed.append(tag)
    return removed


# --------------------------------------------------------------------------------------------------
# resume: which checkpoint, verified
# --------------------------------------------------------------------------------------------------


def resume_candidates(resume: str, output_dir: str | Path) -> tuple[list[tuple[Path, str]], bool]:
    """(root, tag) candidates, best first, and whether falling back to an older one is allowed.

    '' none; 'auto' the checkpoints under output_dir (`latest`, then newest first); a checkpoints folder
    the same; a tag folder only that one.
    """
    if not resume:
        return [], False
    if resume == "auto":
        root = RunFolder(output_dir).checkpoints
    else:
        folder = Path(resume)
        if not folder.is_dir():
            raise FileNotFoundError(f"checkpoint.resume={resume}: no such checkpoint folder; give a tag folder, a "
                                    f"checkpoints folder with a '{LATEST}' file, or 'auto'")
        if read_latest(folder) is None and not list_tags(folder):
            return [(folder.parent, folder.name)], False
        root = folder
    tags = list_tags(root)[::-1]
    named = read_latest(root)
    if named is not None:
        if named in tags:
            tags.remove(named)
            tags.insert(0, named)
        elif (root / named).is_dir():
            tags.insert(0, named)
    return [(root, tag) for tag in tags], True


def _share(sizes: dict[str, int], rank: int, world_size: int) -> list[str]:
    """This rank's files of a checkpoint, balanced by size (largest first, each to the least loaded rank):
    the same answer on every rank, so that together the ranks cover every file once."""
    loads, mine = [0] * world_size, []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = min(range(world_size), key=lambda r: (loads[r], r))
        loads[owner] += sizes[name]
        if owner == rank:
            mine.append(name)
    return mine


def nonfinite_tensors(folder: Path, names: list[str]) -> list[str]:
    """Problems (one line each, naming the file and the tensor) of the `.pt` files `names` of checkpoint
    `folder` holding NaN or Inf: the backbone, DeepSpeed's model and optimizer states, the head shards.
    The files are memory-mapped (read once, from the page cache right after their hashes were checked),
    not copied; DeepSpeed's optimizer states pickle its own classes, so they are read like DeepSpeed
    reads them, after the manifest vouched for their bytes."""
    problems = []
    for name in names:
        if not name.endswith(".pt"):
            continue
        try:
            state = torch.load(folder / name, map_location="cpu", mmap=True, weights_only=False)
        except Exception as exc:  # torch raises several types for an unreadable file
            problems.append(f"{folder / name} is unreadable: {type(exc).__name__}: {exc}")
            continue
        problem = nonfinite_problem(state)
        if problem:
            problems.append(f"{folder / name} {problem}")
    return problems


def checkpoint_problems(folder: Path, *, rank: int, world_size: int, group) -> list[str]:
    """Every problem of checkpoint `folder` (none: intact and finite): its files against the manifest,
    then, when they match, their tensors for NaN/Inf. Each rank checks a share of the files. Collective."""
    try:
        sizes = {name: entry["size"] for name, entry in read_manifest(folder)["files"].items()}
    except CheckpointCorrupt as exc:
        return [str(exc)]
    mine = _share(sizes, rank, world_size)
    problems = [p for part in _gather(check_files(folder, mine), group, world_size) for p in part]
    if problems:
        return problems
    return [p for part in _gather(nonfinite_tensors(folder, mine), group, world_size) for p in part]


def select_checkpoint(candidates: list[tuple[Path, str]], fallback: bool, *, rank: int, world_size: int,
                      group) -> tuple[Path, str] | None:
    """The first candidate whose files all match its manifest and whose tensors are finite, checked by all
    ranks together. A damaged one is skipped with a warning naming the file (or the non-finite tensor);
    with no fallback (an explicit tag folder) it is an error. Collective."""
    problems_seen = []
    for root, tag in candidates:
        folder = root / tag
        problems = checkpoint_problems(folder, rank=rank, world_size=world_size, group=group)
        if not problems:
            if problems_seen:
                log.warning("resuming from %s, the newest intact checkpoint", folder)
            return root, tag
        message = f"checkpoint {folder} is damaged: {'; '.join(problems)}"
        if not fallback:
            raise CheckpointCorrupt(message)
        log.warning("%s; falling back to the previous checkpoint", message)
        problems_seen.append(message)
    if problems_seen:
        raise CheckpointCorrupt(f"no intact checkpoint to resume from: {' | '.join(problems_seen)}; remove the damaged "
                                f"folders, or start afresh in another train.output_dir")
    return None


def _move_aside(root: Path, later: list[str]) -> Path:
    """Move the checkpoints `later` of checkpoints folder `root`, their universal conversions and staging
    leftovers, and a copy of `latest`, into a new `root/abandoned-<UTC time>/`; returns it. Rank 0 only."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = root / f"{ABANDONED_PREFIX}{stamp}"
    number = 1
    while True:
        try:
            aside.mkdir()
            break
        except FileExistsError:
            number += 1
            aside = root / f"{ABANDONED_PREFIX}{stamp}-{number}"
    for tag in later:
        os.replace(root / tag, aside / tag)
        for leftover in root.glob(f".{tag}.partial-*"):
            os.replace(leftover, aside / leftover.name)
        for conversion in (root / UNIVERSAL).glob(f"{tag}-*"):  # keyed `<tag>-<manifest digest>`
            (aside / UNIVERSAL).mkdir(exist_ok=True)
            os.replace(conversion, aside / UNIVERSAL / conversion.name)
    named = read_latest(root)
    if named is not None:
        atomic_write_text(aside / LATEST, named)  # the set-aside folder resumes like a checkpoints folder
    return aside


def _point_latest(root: Path) -> None:
    """`latest` names the newest checkpoint left in `root` (none left: no pointer). Rank 0 only."""
    remaining = list_tags(root)
    if remaining:
        atomic_write_text(root / LATEST, remaining[-1], durable=True)
    else:
        (root / LATEST).unlink(missing_ok=True)


def set_aside_later(root: Path, samples_seen: int, resumed: Path, *, rank: int, world_size: int,
                    group) -> Path | None:
    """Resuming `resumed` (at `samples_seen`) in a run whose checkpoints folder `root` holds later
    checkpoints: rank 0 moves them aside (see the module docstring) and warns once, naming where. Every
    rank takes rank 0's answer (listing the folder itself could race with the move) before going on; a
    failed move stops every rank, nothing deleted. Returns the folder they went to, or None when there
    were none. Collective."""
    answer = None
    if rank == 0:
        later = [tag for tag in list_tags(root) if int(TAG_PATTERN.match(tag).group(1)) > samples_seen]
        aside, error = None, None
        try:
            if later:
                aside = _move_aside(root, later)
                _point_latest(root)
        except OSError as exc:
            error = (f"setting aside the checkpoints after {resumed} ({', '.join(later)}) failed: "
                     f"{describe_error(exc, root / later[0])}")
        answer = (later, aside, error)
    later, aside, error = _gather(answer, group, world_size)[0]
    if error:
        raise CheckpointSaveError(f"{error}; nothing was deleted: move them out of {root} by hand")
    if aside is not None and rank == 0:
        log.warning("resuming %s, older than this run's newest checkpoints: moved the later ones (%s) and their "
                    "universal conversions aside into %s (nothing deleted; the re-trained run writes its own "
                    "checkpoints under those names and `latest` follows them; checkpoint.resume=%s resumes "
                    "the abandoned branch)", resumed, ", ".join(later), aside, aside)
    return aside


def refuse_foreign_checkpoints(output_dir: str | Path) -> None:
    """A fresh run (checkpoint.resume='') in a folder that holds checkpoints is refused: its keep_last and
    `latest` would mix with the earlier run's."""
    root = RunFolder(output_dir).checkpoints
    tags = list_tags(root)
    if tags or read_latest(root) is not None:
        newest = (tags or ["?"])[-1]
        run = run_of(root / newest) or "an earlier run"
        raise ConfigError(f"train.output_dir={output_dir} already holds checkpoints of run {run} (newest "
                          f"{root / newest}): resume that run with checkpoint.resume=auto, or choose a new "
                          f"train.output_dir for a fresh run")


def prepare_resume(root: Path, tag: str, *, world_size: int, rank: int, group, ds_config: dict) -> Path:
    """The folder DeepSpeed loads the engine of checkpoint `tag` from. Collective; call before the engine
    is built.

    On the world size that saved it: `root` itself. On another world size DeepSpeed refuses ZeRO-1/2
    optimizer partitions of a different count, so rank 0 converts the checkpoint once into DeepSpeed's
    universal format (by deepspeed.checkpoint.ds_to_universal, written to a temporary name and
    renamed), and the engine is told to load universal checkpoints. The conversion is cached as
    `root/universal/<tag>-<manifest digest>/<tag>`: a conversion of any other checkpoint of that name
    (an earlier run in the same folder) is never reused. The head's shards are re-split by lvface
    itself (lvface/checkpoint/head.py).
    """
    state_file = root / tag / TRAIN_STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{state_file} is missing: {root / tag} is not a complete lvface checkpoint")
    saved_world = json.loads(state_file.read_text())["world_size"]
    if saved_world == world_size:
        return root
    universal = root / UNIVERSAL / f"{tag}-{manifest_digest(root / tag)[:16]}"
    if rank == 0 and not (universal / tag / "zero").is_dir():
        universal.mkdir(parents=True, exist_ok=True)
        tmp = universal / f".{tag}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("converting %s (%d ranks) to a DeepSpeed universal checkpoint for %d ranks", root / tag,
                 saved_world, world_size)
        proc = run_with_progress(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(root / tag),
             "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"],
            desc="universal checkpoint")
        if proc.returncode != 0:
            raise RuntimeError(f"deepspeed.checkpoint.ds_to_universal failed on {root / tag}:\n{proc.stderr[-3000:]}")
        os.replace(tmp, universal / tag)
    dist.barrier(group=group)
    ds_config.setdefault("checkpoint", {})["load_universal"] = True
    return universal


def load_checkpoint(root: Path, tag: str, *, engine, head, head_optimizer, engine_root: Path | None = None) -> dict:
    """Restore engine, head and head optimizer from (root, tag); returns the saved train_state.
    `engine_root` is where DeepSpeed's files are read (prepare_resume's answer; default `root`)."""
    # The head first: a class-count mismatch is refused with both numbers before DeepSpeed loads anything.
    load_head_shards(root / tag, head, head_optimizer)
    engine_root = engine_root or root
    load_path, client_state = engine.load_checkpoint(str(engine_root), tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint {tag!r} under {engine_root}")
    if engine_root != root:
        # A universal checkpoint restores parameters and optimizer state but not module buffers
        # (BatchNorm running statistics): take them from the checkpoint's plain backbone.
        saved = torch.load(root / tag / BACKBONE_FILE, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, buffer in engine.module.named_buffers():
                buffer.copy_(saved[name])
    log.info("resumed from %s", root / tag)
    return client_state["lvface"]


# --------------------------------------------------------------------------------------------------
# the trainer's checkpointer
# --------------------------------------------------------------------------------------------------


class Checkpointer:
    """The trainer's checkpoints of one run folder; every method is collective.

    Resume comes in two phases because DeepSpeed must know before the engine is built whether it loads
    a universal checkpoint: `resume()` picks the checkpoint and prepares it (before the engine), `load()`
    restores the engine, head and head optimizer from it (after). `save(state, force)` writes a
    checkpoint when forced or when `checkpoint.every_steps` divides the step.
    """

    def __init__(self, run: RunFolder, cfg: CheckpointConfig, *, ds_config: dict, config_yaml: str, metrics,
                 rank: int, world_size: int, group):
        """`ds_config` is the dict the engine is built from after `resume()` (which may switch it to
        universal loading); `metrics` (lvface.metrics.TrainMetrics) times and counts the saves."""
        self.run, self.root, self.cfg = run, run.checkpoints, cfg
        self.ds_config, self.config_yaml, self.metrics = ds_config, config_yaml, metrics
        self.rank, self.world_size, self.group = rank, world_size, group
        self.run_id = ""
        self.selected: tuple[Path, str] | None = None
        self.engine_root: Path | None = None
        self.writer: Writer | None = None  # this rank's writer process, started by the first background save
        self.pool: BufferPool | None = None
        self.inflight: _InFlight | None = None
        self.waits = 0
        self.current_step = 0
        """Saves that were due while the previous one was still being written (and waited for it)."""
        self.history: list[dict] = []
        """One record per save: tag, mode, step, stall_s (what the step boundary waited for: the snapshot, or
        the whole synchronous save), committed_step; a background save also write_s (snapshot to commit)."""
        atexit.register(self._abandon_inflight)
        if self.cfg.async_save and multiprocessing.current_process().daemon:
            log.warning("checkpoint.async_save: this rank runs in a daemonic process, which cannot start a writer "
                        "process; checkpoints are written synchronously")
            self.cfg = dataclasses.replace(self.cfg, async_save=False)
        if self.cfg.async_save:
            # Started first: its interpreter and torch import (~2 s of CPU) overlap the rank's own start
            # instead of its first steps, and it is ready for the first save
            self.pool = BufferPool(shared=True)
            self._ensure_writer()

    def _abandon_inflight(self) -> None:
        """At the exit of a process that failed elsewhere (a full disk meeting the metrics log, say) while a
        background save was in flight: its writer is ended and rank 0 removes the staging folder, so no
        half-written checkpoint is left; `latest` still names the last committed one."""
        if self.inflight is not None:
            self._drop_writer()
            if self.rank == 0:
                shutil.rmtree(self.inflight.staging, ignore_errors=True)
            self.inflight = None

    def resume(self) -> TrainState | None:
        """The saved state of the checkpoint to resume (checkpoint.resume; verified against its manifest, a
        damaged or non-finite one falls back), or None for a fresh run, which a folder of another run's
        checkpoints refuses. Checkpoints of the run folder later than the resumed one are set aside (a
        rollback; see the module docstring). Call before the engine is built."""
        candidates, fallback = resume_candidates(self.cfg.resume, self.run.path)
        self.selected = select_checkpoint(candidates, fallback, rank=self.rank, world_size=self.world_size,
                                          group=self.group)
        if self.selected is None:
            refuse_foreign_checkpoints(self.run.path)
            self.run_id = _gather(new_run_id(), self.group, self.world_size)[0]  # rank 0's
            return None
        root, tag = self.selected
        saved = TrainState().load_state_dict(json.loads((root / tag / TRAIN_STATE_FILE).read_text()))
        self.run_id = saved.run_id or _gather(new_run_id(), self.group, self.world_size)[0]
        set_aside_later(self.root, saved.samples_seen, root / tag, rank=self.rank, world_size=self.world_size,
                        group=self.group)
        self.engine_root = prepare_resume(root, tag, world_size=self.world_size, rank=self.rank, group=self.group,
                                          ds_config=self.ds_config)
        if saved.world_size != self.world_size:
            log.info("resuming a %d-rank checkpoint on %d ranks: the head is re-split, the step counter "
                     "continues from the samples seen", saved.world_size, self.world_size)
        return saved

    def init_backbone(self, backbone: torch.nn.Module) -> None:
        """Start the backbone from published weights (checkpoint.init_backbone: any form lvface.checkpoint.files
        reads, .safetensors included); a resume's weights replace them in `load()`."""
        if self.cfg.init_backbone:
            log.info("backbone initialised from %s", load_backbone_into(backbone, self.cfg.init_backbone))

    def load(self, engine, head, head_optimizer) -> None:
        """Restore the checkpoint `resume()` chose into the built engine, head and head optimizer (nothing
        on a fresh run)."""
        if self.selected is not None:
            load_checkpoint(*self.selected, engine=engine, head=head, head_optimizer=head_optimizer,
                            engine_root=self.engine_root)
        self.engine, self.head, self.head_optimizer = engine, head, head_optimizer
        if self.rank == 0:  # no save has begun yet: a staging folder of this run is a crashed process's
            removed = _remove_own_staging(self.root, self.run_id)
            if removed:
                log.info("removed the unfinished saves of an earlier process of this run: %s", ", ".join(removed))
        if self.cfg.async_save:
            self._allocate_buffers()  # also the barrier after the removal
        else:
            self._barrier()

    def _allocate_buffers(self) -> None:
        """Capture once now, writing nothing, so that the snapshot buffers exist (allocated, faulted in,
        pinned on CUDA) before the first save: allocating 2.2 GB per rank (ViT-T, 500k classes) inside
        the first save stalled it 5.8 s against 0.3 s for a save into warm buffers. Collective."""
        start = time.perf_counter()
        capture = Capture(self.pool)
        state = TrainState(run_id=self.run_id).state_dict()
        capture_checkpoint(capture, self.root, staging_folder(self.root, "buffers", self.run_id), engine=self.engine,
                           head=self.head, head_optimizer=self.head_optimizer, config_yaml=self.config_yaml,
                           train_state=state, zero_stage=zero_stage(self.ds_config), rank=self.rank)
        size = sum(buffer.numel() for buffer in self.pool.buffers.values())
        log.info("checkpoint snapshot buffers: %.2f GB on this rank, allocated in %.2f s", size / 1e9,
                 time.perf_counter() - start)

    def _ensure_writer(self) -> None:
        """A live writer process (a new one, fed every buffer again, when the last one died idle)."""
        if self.writer is not None and self.writer.process.is_alive():
            return
        if self.writer is not None:
            log.warning("checkpoint writer process %d ended (exit code %s) between saves: starting another",
                        self.writer.pid, self.writer.process.exitcode)
            self._drop_writer()
        self.writer = Writer()
        self.pool.unsent = dict(self.pool.buffers)
        log.info("checkpoint writer process %d started", self.writer.pid)

    def _drop_writer(self) -> None:
        """Kill this rank's writer (a failed save: its unfinished job and answer are abandoned)."""
        if self.writer is not None:
            self.writer.close(abandon=True)
            self.writer = None

    def save(self, state: TrainState, force: bool = False) -> Path | None:
        """Write `state` with the loaded objects' tensors when forced or at the interval; returns the
        checkpoint's folder, or None when none was due. Called at every step boundary: it also advances
        a background save in flight (one tiny all-reduce while one is). A forced save (the end, a
        preemption) returns once it is committed; with checkpoint.async_save a save at the interval returns
        after the snapshot and is committed at a later step boundary."""
        due = force or bool(self.cfg.every_steps and state.step % self.cfg.every_steps == 0)
        self.current_step = state.step
        if self.inflight is not None:
            if due:
                log.info("checkpoint %s is due while %s is still being written: waiting for it",
                         tag_for(state.samples_seen), self.inflight.tag)
                self.waits += 1
            self._advance(wait=due)
        if not due:
            return None
        tag = tag_for(state.samples_seen)
        if self.selected is not None and (self.root / tag).resolve() == (self.selected[0] / self.selected[1]).resolve():
            # no step since the resume (the samples seen name the tag): the resumed checkpoint is this state
            log.info("checkpoint %s already holds this state (resumed, no step since): not written again",
                     self.root / tag)
            return self.root / tag
        if not self.cfg.async_save:
            arrived, start = time.time(), time.perf_counter()
            with self.metrics.timer("checkpoint_save"):
                folder = save_checkpoint(self.root, tag, engine=self.engine, head=self.head,
                                         head_optimizer=self.head_optimizer, config_yaml=self.config_yaml,
                                         train_state=state.state_dict(), zero_stage=zero_stage(self.ds_config),
                                         rank=self.rank, world_size=self.world_size, group=self.group,
                                         keep_last=self.cfg.keep_last)
            self.metrics.count("checkpoints")
            self._barrier()
            self.history.append({"tag": tag, "mode": "sync", "step": state.step, "stall_s": time.perf_counter() - start,
                                 "arrived": arrived, "left": time.time(), "committed_step": state.step})
            return folder
        with self.metrics.timer("checkpoint_save"):
            self._snapshot(tag, state)
        if force:
            while self.inflight is not None:
                self._advance(wait=True)
            self._barrier()
        return self.root / tag

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)

    def _snapshot(self, tag: str, state: TrainState) -> None:
        """Capture checkpoint `tag` into the reused buffers and hand it to this rank's writer. Collective."""
        train_state = state.state_dict()
        arrived, start = time.time(), time.perf_counter()
        refuse_existing(self.root / tag, self.run_id)
        staging = staging_folder(self.root, tag, self.run_id)
        capture = Capture(self.pool)
        self._ensure_writer()
        # NaN/Inf is looked for by the writer, in the copy it writes (write_files' check_finite), not here
        error = _capture_or_error(capture, self.root, staging, self.rank, engine=self.engine, head=self.head,
                                  head_optimizer=self.head_optimizer, config_yaml=self.config_yaml,
                                  train_state=train_state, zero_stage=zero_stage(self.ds_config))
        if error is None:
            try:
                with capture.phase("submit_s"):
                    self.writer.send_buffers(self.pool)
                    self.writer.submit(write_files, folder=str(staging), jobs=capture.jobs, check_finite=True)
            except OSError as exc:  # the writer died since the check above
                error = f"rank {self.rank}: the checkpoint writer process cannot take the job: {exc}"
        with capture.phase("agree_s"):
            errors = _agree(error, self.group, self.world_size)
        if errors:
            self._drop_writer()  # no writer may still write into the folder rank 0 removes
            self._barrier()
            raise _save_failed(self.root, tag, staging, errors, self.rank)
        self.inflight = _InFlight(tag=tag, staging=staging, train_state=train_state, step=state.step,
                                  stall_s=time.perf_counter() - start, started=time.perf_counter())
        self.inflight.record.update(arrived=arrived, left=time.time(),
                                    phases={k: round(v, 4) for k, v in capture.phases.items()})
        self.history.append(self.inflight.record)

    def _advance(self, wait: bool) -> None:
        """Move the save in flight on by what every rank's writer has finished (agreed by one all-reduce);
        with `wait`, until it is committed. Collective."""
        while self.inflight is not None:
            flight = self.inflight
            mine = flight.writing or (self.rank == 0)
            if mine and flight.answer is None:
                flight.answer = self._local_answer(wait)
            busy = mine and flight.answer is None
            failed = flight.answer is not None and flight.answer[0] == "error"
            flags = torch.tensor([float(busy), float(failed)], device=self.head.weight.device)
            if self.world_size > 1:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
            if flags[1]:
                self.inflight = None
                self._drop_writer()  # no rank's writer may still write into the folder rank 0 removes
                errors = _agree(flight.answer[1] if failed else None, self.group, self.world_size)
                raise _save_failed(self.root, flight.tag, flight.staging, errors, self.rank)
            if flags[0]:
                if not wait:
                    return
                continue
            self._next_phase(flight)

    def _local_answer(self, wait: bool):
        try:
            while True:
                answer = self.writer.poll(timeout=1.0 if wait else 0.0)
                if answer is not None and answer[0] == "error":
                    return ("error", f"rank {self.rank}: {answer[1]}")
                if answer is not None or not wait:
                    return answer
        except WriterDied as exc:
            return ("error", f"rank {self.rank}: {exc}")

    def _next_phase(self, flight: "_InFlight") -> None:
        """Every rank's files are written: rank 0 hands the commit to its writer. Committed: done."""
        if flight.writing:
            files = {k: v for part in _gather(flight.answer[1], self.group, self.world_size) for k, v in part.items()}
            flight.writing, flight.answer = False, None
            flight.record["written_step"] = self.current_step
            if self.rank == 0:
                self.writer.submit(commit_checkpoint, root=str(self.root), tag=flight.tag, staging=str(flight.staging),
                                   files=files, info=_manifest_info(flight.tag, flight.train_state, self.world_size),
                                   keep_last=self.cfg.keep_last)
            return
        removed = flight.answer[1] if self.rank == 0 else []
        flight.record.update(write_s=time.perf_counter() - flight.started, committed_step=self.current_step)
        self.inflight = None
        self.metrics.count("checkpoints")
        log.info("checkpoint %s written in the background (%.2f s after the snapshot)%s", self.root / flight.tag,
                 flight.record["write_s"], f"; removed older checkpoints of this run: {', '.join(removed)}"
                 if removed else "")

    def close(self) -> None:
        """Finish the save in flight (collective) and stop the writer process."""
        while self.inflight is not None:
            self._advance(wait=True)
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class _InFlight:
    """A background save between its snapshot and its commit."""

    tag: str
    staging: Path
    train_state: dict
    step: int
    stall_s: float
    started: float
    writing: bool = True
    """Every rank's writer is writing; False: rank 0's writer is committing."""
    answer: tuple | None = None
    record: dict = field(default_factory=dict)

    def __post_init__(self):
        self.record.update(tag=self.tag, mode="async", step=self.step, stall_s=self.stall_s)


def _reshard_command(args) -> int:
    from lvface.checkpoint.head import reshard_head_checkpoint

    written = reshard_head_checkpoint(args.src, args.dst, args.world_size)
    print(f"wrote {len(written)} head shards for {args.world_size} ranks into {args.dst}")
    return 0


def register(subparsers) -> None:
    """`lvface reshard SRC DST --world-size N`: re-split a checkpoint's head shards offline."""
    parser = subparsers.add_parser(
        "reshard", help="re-split the head shards of a checkpoint for another world size (offline)")
    parser.add_argument("src", help="checkpoint tag folder holding head_shard_*_of_*.pt files")
    parser.add_argument("dst", help="empty folder for the new shard files")
    parser.add_argument("--world-size", type=int, required=True, help="number of ranks to split the classes over")
    parser.set_defaults(func=_reshard_command)
