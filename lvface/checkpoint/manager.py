"""Save and resume training: the DeepSpeed engine's shards, the head, the config, a plain backbone.

A checkpoint is the folder `<output_dir>/checkpoints/samples<N>/`, named by the samples the run had
seen (N, 12 digits), so that checkpoints of runs on different world sizes cannot collide. Nothing is
ever written into an existing checkpoint folder: a save writes `.samples<N>.partial-<run>/`, every
rank hashes its share of the files, rank 0 writes `manifest.json` (lvface/checkpoint/manifest.py) and
renames the folder into place, and only then moves the `latest` pointer. A crash or a failed write
mid-save leaves the previous checkpoint and `latest` as they were; resume checks every file against
the manifest and every tensor for NaN/Inf, and falls back to the newest checkpoint that is intact and
finite, naming the damaged file or tensor.

Resuming a checkpoint older than the run folder's newest (a rollback: the usual answer to a loss
spike, re-trained with another seed or learning rate) sets the later checkpoints aside, never deleting
them: rank 0 moves them, with their universal conversions and a copy of `latest`, into
`checkpoints/abandoned-<UTC time>/` (itself a checkpoints folder that `checkpoint.resume` accepts),
so the re-trained run writes its own states under those names and `latest` names them.

Contents of a tag folder:
- DeepSpeed's own files (model states, ZeRO-partitioned optimizer states, the LR scheduler);
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

import errno
import json
import logging
import os
import re
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from lvface.checkpoint.files import BACKBONE_FILE, CONFIG_FILE, LATEST, TRAIN_STATE_FILE, load_backbone_into, read_latest
from lvface.checkpoint.head import load_head_shards, save_head_shard
from lvface.checkpoint.manifest import (MANIFEST, CheckpointCorrupt, check_files, checkpoint_files, describe_files,
                                        manifest_digest, manifest_text, read_manifest)
from lvface.checkpoint.state import TrainState
from lvface.config import CheckpointConfig, ConfigError
from lvface.engine import zero_stage
from lvface.files import atomic_torch_save, atomic_write_json, atomic_write_text
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
    low_precision = engine.bfloat16_enabled() or engine.fp16_enabled()
    masters = {}
    if low_precision or stage == 3:
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


def _describe_error(exc: BaseException, where: Path) -> str:
    if isinstance(exc, OSError):
        path = exc.filename or where
        reason = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            reason = f"no space left on device ({shutil.disk_usage(where.parent).free >> 20} MiB free)"
        return f"{path}: {reason}"
    try:
        free = shutil.disk_usage(where.parent).free
    except OSError:
        free = None
    hint = f" (no space left on device: {free >> 20} MiB free)" if free is not None and free < (64 << 20) else ""
    return f"{where}: {type(exc).__name__}: {exc}{hint}"


def _gather(mine, group, world_size: int) -> list:
    """Every rank's `mine` (any picklable value), in rank order, on every rank; also a barrier."""
    if world_size == 1:
        return [mine]
    parts: list = [None] * world_size
    dist.all_gather_object(parts, mine, group=group)
    return parts


def _agree(error: str | None, group, world_size: int) -> list[str]:
    """Every rank's error (None = fine) on every rank; also a barrier."""
    return [e for e in _gather(error, group, world_size) if e]


def _nonfinite_tensors(named: dict[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in named.items()
            if tensor is not None and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


def _refuse_nonfinite(folder: Path, engine, head, zero_stage: int, rank: int, world_size: int, group) -> None:
    """A checkpoint never holds non-finite values: refuse before anything is written. Collective."""
    named = {f"backbone.{k}": v for k, v in engine.module.state_dict().items()}
    named.update({"head.weight": head.weight, "head.prototypes": head.prototypes})
    bad = _nonfinite_tensors(named) if zero_stage < 3 else _nonfinite_tensors(
        {"head.weight": head.weight, "head.prototypes": head.prototypes})
    errors = _agree(f"rank {rank}: non-finite values in {', '.join(bad[:5])}" if bad else None, group, world_size)
    if errors:
        raise CheckpointSaveError(f"not saving {folder}: {'; '.join(errors)}")


def _save_engine(engine, root: Path, staging: Path, folder: Path, train_state: dict, rank: int) -> None:
    """DeepSpeed's files of the checkpoint, into `staging`."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    # The (empty) universal-checkpoint info lets DeepSpeed's ds_to_universal convert this checkpoint
    # when it is resumed on another world size: a pure data-parallel backbone needs no patterns.
    client_state = {"lvface": train_state, UNIVERSAL_CHECKPOINT_INFO: {}}
    try:
        engine.save_checkpoint(str(root), tag=staging.name, client_state=client_state, save_latest=False)
    except Exception as exc:  # DeepSpeed's own writes: torch.save's errors name no path or reason
        # No collective after this point: the other ranks stop at their next one (collective timeout).
        reason = _describe_error(exc, staging)
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointSaveError(f"saving checkpoint {folder} failed while DeepSpeed wrote its files: "
                                  f"{reason}; the previous checkpoint and {root / LATEST} "
                                  f"are unchanged") from exc


def _write_lvface_files(staging: Path, *, engine, head, head_optimizer, config_yaml: str, train_state: dict,
                        zero_stage: int, rank: int) -> str | None:
    """lvface's own files of the checkpoint (this rank's head shard; rank 0 the rest); this rank's error,
    if any. Collective (the master weights)."""
    try:
        backbone = master_state_dict(engine, zero_stage)  # collective: every rank takes part
        backbone = backbone if rank == 0 else None
        save_head_shard(staging, head, head_optimizer, extra={"samples_seen": train_state["samples_seen"]},
                        barrier=False)
        if rank == 0:
            atomic_torch_save(backbone, staging / BACKBONE_FILE)
            atomic_write_text(staging / CONFIG_FILE, config_yaml)
            atomic_write_json(staging / TRAIN_STATE_FILE, train_state)
    except (OSError, RuntimeError) as exc:
        return f"rank {rank}: {_describe_error(exc, staging)}"
    return None


def _publish(root: Path, tag: str, staging: Path, train_state: dict, rank: int, world_size: int, group) -> list[str]:
    """Hash the staged files (spread over the ranks); then rank 0 writes the manifest, renames the folder
    into place and only then moves `latest`. Every rank's errors (none: published). Collective."""
    names = checkpoint_files(staging)
    error = None
    try:
        mine = describe_files(staging, names[rank::world_size])
    except OSError as exc:
        mine, error = {}, f"rank {rank}: {_describe_error(exc, staging)}"
    errors = _agree(error, group, world_size)
    if errors:
        return errors
    files = {k: v for part in _gather(mine, group, world_size) for k, v in part.items()}
    if rank == 0:
        try:
            info = {"run_id": train_state["run_id"], "tag": tag, "samples_seen": train_state["samples_seen"],
                    "world_size": world_size}
            atomic_write_text(staging / MANIFEST, manifest_text(files, info))
            os.replace(staging, root / tag)
            atomic_write_text(root / LATEST, tag)
        except OSError as exc:
            error = f"rank 0: {_describe_error(exc, staging)}"
    return _agree(error, group, world_size)


def save_checkpoint(root: Path, tag: str, *, engine, head, head_optimizer, config_yaml: str, train_state: dict,
                    zero_stage: int, rank: int, world_size: int, group) -> Path:
    """Write checkpoint `tag` on every rank (see the module docstring); returns its folder. Collective."""
    folder = root / tag
    run_id = train_state["run_id"]
    if folder.exists():  # a resume sets later checkpoints aside: another run or process wrote this one
        raise CheckpointSaveError(f"{folder} exists and is not the checkpoint this run resumed from: lvface never "
                                  f"writes into an existing checkpoint folder; choose another train.output_dir")
    _refuse_nonfinite(folder, engine, head, zero_stage, rank, world_size, group)
    staging = root / f".{tag}.partial-{run_id}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a save of this run that crashed
    _save_engine(engine, root, staging, folder, train_state, rank)
    errors = _agree(_write_lvface_files(staging, engine=engine, head=head, head_optimizer=head_optimizer,
                                        config_yaml=config_yaml, train_state=train_state, zero_stage=zero_stage,
                                        rank=rank), group, world_size)
    errors = errors or _publish(root, tag, staging, train_state, rank, world_size, group)
    if errors:
        if rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise CheckpointSaveError(f"saving checkpoint {folder} failed: {'; '.join(errors)}; the previous "
                                  f"checkpoint and {root / LATEST} are unchanged")
    log.info("checkpoint %s written", folder)
    return folder


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


def _nonfinite_leaves(value, where: str) -> list[str]:
    """Names (`where.key.key[i]`) of the floating tensors in a nested dict/list that hold NaN or Inf."""
    if isinstance(value, torch.Tensor):
        # min and max propagate NaN and show an Inf: one pass, no temporary of the tensor's size (measured
        # on the 2-core machine: 6.4 GB/s, against 0.23 GB/s for isfinite().all())
        bad = value.is_floating_point() and value.numel() > 0 and \
            not bool(torch.isfinite(torch.stack(torch.aminmax(value))).all())
        return [where] if bad else []
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = ((f"[{i}]", item) for i, item in enumerate(value))
    else:
        return []
    found = []
    for key, item in items:
        key = str(key)
        found += _nonfinite_leaves(item, f"{where}{key}" if key.startswith("[") else f"{where}.{key}")
    return found


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
        bad = [leaf.lstrip(".") for leaf in _nonfinite_leaves(state, "")]
        if bad:
            problems.append(f"{folder / name} holds non-finite values (NaN/Inf) in {', '.join(bad[:5])}"
                            + (f" and {len(bad) - 5} more tensors" if len(bad) > 5 else ""))
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
        atomic_write_text(root / LATEST, remaining[-1])
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
                     f"{_describe_error(exc, root / later[0])}")
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

    def save(self, state: TrainState, force: bool = False) -> Path | None:
        """Write `state` with the loaded objects' tensors when forced or at the interval; returns the
        checkpoint's folder, or None when none was due."""
        if not (force or (self.cfg.every_steps and state.step % self.cfg.every_steps == 0)):
            return None
        tag = tag_for(state.samples_seen)
        if self.selected is not None and (self.root / tag).resolve() == (self.selected[0] / self.selected[1]).resolve():
            # no step since the resume (the samples seen name the tag): the resumed checkpoint is this state
            log.info("checkpoint %s already holds this state (resumed, no step since): not written again",
                     self.root / tag)
            return self.root / tag
        with self.metrics.timer("checkpoint_save"):
            folder = save_checkpoint(self.root, tag, engine=self.engine, head=self.head,
                                     head_optimizer=self.head_optimizer, config_yaml=self.config_yaml,
                                     train_state=state.state_dict(), zero_stage=zero_stage(self.ds_config),
                                     rank=self.rank, world_size=self.world_size, group=self.group)
        self.metrics.count("checkpoints")
        if self.rank == 0:
            removed = prune_checkpoints(self.root, self.cfg.keep_last, self.run_id, keep=tag)
            if removed:
                log.info("removed older checkpoints of this run: %s", ", ".join(removed))
        if self.world_size > 1:
            dist.barrier(group=self.group)
        return folder


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
