"""Head checkpoints: one file per rank, written atomically, resharded when the world size changes.

A shard file `head_shard_{rank:05d}_of_{world:05d}.pt` holds the rows [class_start, class_start + n)
of W (weight), P (prototypes) and the head optimizer's exp_avg, exp_avg_sq and row_steps, with the
class range, the stage name, the sampling counter and the caller's `extra` dict. Files are written to a
temporary name in the same folder, flushed to disk and renamed, so a crash leaves either the old file
or the new one, never half of one.

Loading on any world size: each rank computes its own class range, opens (memory-mapped) only the
source shards that overlap it, and copies the overlapping rows. The reassembled global W, P and
moments are therefore identical whatever the source and target world sizes; `reshard_head_checkpoint`
does the same offline, writing a new set of shard files.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
import torch.distributed as dist

from lvface.files import atomic_torch_save
from lvface.heads.sharded_softmax import shard_range
from lvface.progress import progress

log = logging.getLogger(__name__)

FORMAT = "lvface-head-shard"
VERSION = 1
_NAME = re.compile(r"^head_shard_(\d{5})_of_(\d{5})\.pt$")
_ROW_KEYS = ("weight", "prototypes", "exp_avg", "exp_avg_sq", "row_steps")
_OPT_KEYS = ("exp_avg", "exp_avg_sq", "row_steps")
_COMMON_KEYS = ("format", "version", "num_classes", "embedding_size", "stage", "sample_step", "extra")


def shard_file_name(rank: int, world_size: int) -> str:
    return f"head_shard_{rank:05d}_of_{world_size:05d}.pt"


def shard_payload(head, opt, extra: dict) -> dict:
    """The content of this rank's shard file: its rows (the live tensors, not copies) and their metadata."""
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "num_classes": head.num_classes,
        "embedding_size": head.embedding_size,
        "world_size": head.world_size,
        "rank": head.rank,
        "class_start": head.class_start,
        "num_local_classes": head.num_local_classes,
        "stage": head.stage.name,
        "sample_step": head.sample_step,
        "weight": head.weight.detach().cpu(),
        "prototypes": head.prototypes.detach().cpu(),
        "extra": dict(extra or {}),
    }
    for key in _OPT_KEYS:
        payload[key] = getattr(opt, key).detach().cpu() if opt is not None else None
    return payload


def save_head_shard(path_dir, head, opt, extra: dict | None = None, barrier: bool = True) -> Path:
    """Write this rank's head shard into `path_dir` (created if missing); returns the file path.

    Collective over head.group unless `barrier=False` (a caller that agrees on errors itself): ends
    with a barrier, so when it returns on any rank every shard of the checkpoint is complete. `extra`
    is stored as given (plain Python data and tensors); it is meant to be the same on every rank, and
    load_head_shards returns rank 0's.
    """
    directory = Path(path_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / shard_file_name(head.rank, head.world_size)
    atomic_torch_save(shard_payload(head, opt, extra), path)
    if barrier and head.world_size > 1:
        dist.barrier(group=head.group)
    return path


# --------------------------------------------------------------------------------------------------
# Reading a set of shards
# --------------------------------------------------------------------------------------------------


class _ShardSet:
    """The complete set of shard files of one checkpoint folder, opened lazily (memory-mapped)."""

    def __init__(self, path_dir):
        self.directory = Path(path_dir)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"head checkpoint folder {self.directory} does not exist")
        found: dict[int, dict[int, Path]] = {}
        for entry in self.directory.iterdir():
            match = _NAME.match(entry.name)
            if match:
                found.setdefault(int(match.group(2)), {})[int(match.group(1))] = entry
        if not found:
            raise FileNotFoundError(f"no head shard files (head_shard_*_of_*.pt) in {self.directory}")
        if len(found) > 1:
            raise ValueError(
                f"{self.directory} holds head shards of several world sizes {sorted(found)}; keep one set per folder"
            )
        (self.world_size, files), = found.items()
        missing = [r for r in range(self.world_size) if r not in files]
        if missing:
            raise FileNotFoundError(
                f"head checkpoint {self.directory} is incomplete: shards of ranks {missing} of "
                f"{self.world_size} are missing"
            )
        self.files = [files[r] for r in range(self.world_size)]
        self._open: dict[int, dict] = {}
        first = self.shard(0)
        self.num_classes = first["num_classes"]
        self.embedding_size = first["embedding_size"]
        self.has_optimizer = first["exp_avg"] is not None

    def shard(self, rank: int) -> dict:
        if rank not in self._open:
            data = torch.load(self.files[rank], map_location="cpu", mmap=True, weights_only=True)
            if data.get("format") != FORMAT:
                raise ValueError(f"{self.files[rank]} is not an lvface head shard (format {data.get('format')!r})")
            if data["version"] > VERSION:
                raise ValueError(
                    f"{self.files[rank]} has head shard version {data['version']}; this lvface reads <= {VERSION}"
                )
            expected = shard_range(data["num_classes"], self.world_size, rank)
            if (data["class_start"], data["num_local_classes"]) != expected or data["world_size"] != self.world_size:
                raise ValueError(f"{self.files[rank]}: class range {data['class_start']}+{data['num_local_classes']} "
                                 f"does not match its name (expected {expected[0]}+{expected[1]})")
            self._open[rank] = data
        return self._open[rank]

    def rows(self, key: str, start: int, count: int) -> torch.Tensor:
        """Global rows [start, start + count) of `key`, assembled from the overlapping shards."""
        pieces = []
        for rank in range(self.world_size):
            src_start, src_count = shard_range(self.num_classes, self.world_size, rank)
            lo, hi = max(start, src_start), min(start + count, src_start + src_count)
            if lo < hi:
                pieces.append(self.shard(rank)[key][lo - src_start : hi - src_start])
        if not pieces:
            template = self.shard(0)[key]
            return template.new_empty((0,) + tuple(template.shape[1:]))
        return torch.cat(pieces)


def _check_compatible(shards: _ShardSet, num_classes: int, embedding_size: int) -> None:
    if shards.num_classes != num_classes:
        raise ValueError(
            f"head checkpoint {shards.directory} has {shards.num_classes} classes but the config has "
            f"{num_classes} (data.num_classes); a head cannot be resumed on a different class count"
        )
    if shards.embedding_size != embedding_size:
        raise ValueError(
            f"head checkpoint {shards.directory} has embedding size {shards.embedding_size} but the model has "
            f"{embedding_size} (model.num_features)"
        )


def load_head_shards(path_dir, head, opt=None) -> dict:
    """Load W, P (and the optimizer moments when `opt` is given) of this rank's class range from the
    shard files in `path_dir`, whatever world size wrote them. Returns rank 0's `extra` dict.

    Refuses a checkpoint whose class count or embedding size differs from the head's, naming both.
    Restores the stage by name when the config has it (the trainer also sets it from the epoch) and
    the sampling counter. No collective: every rank reads only the files it needs.
    """
    shards = _ShardSet(path_dir)
    _check_compatible(shards, head.num_classes, head.embedding_size)
    if opt is not None and not shards.has_optimizer:
        raise ValueError(f"head checkpoint {shards.directory} has no optimizer state; load it with opt=None")
    start, count = head.class_start, head.num_local_classes
    with torch.no_grad():
        head.weight.copy_(shards.rows("weight", start, count))
        head.prototypes.copy_(shards.rows("prototypes", start, count))
        if opt is not None:
            for key in _OPT_KEYS:
                getattr(opt, key).copy_(shards.rows(key, start, count))
    first = shards.shard(0)
    head.sample_step = int(first["sample_step"])
    stages = {stage.name: stage for stage in head.loss_cfg.stages}
    if first["stage"] in stages:
        head.set_stage(stages[first["stage"]])
    else:
        log.warning(
            "head checkpoint stage %r is not in loss.stages %s; keeping %r",
            first["stage"], list(stages), head.stage.name,
        )
    return dict(first["extra"])


def reshard_head_checkpoint(src_dir, dst_dir, new_world_size: int) -> list[Path]:
    """Offline: rewrite the head shards of `src_dir` for `new_world_size` ranks into `dst_dir`.

    One destination shard is assembled at a time from memory-mapped sources, so the memory needed is
    about one shard. Returns the written paths. Used by `lvface reshard`.
    """
    if new_world_size < 1:
        raise ValueError(f"new world size must be >= 1, got {new_world_size}")
    shards = _ShardSet(src_dir)
    if new_world_size > shards.num_classes:
        raise ValueError(f"cannot split {shards.num_classes} classes over {new_world_size} ranks")
    destination = Path(dst_dir)
    if destination.resolve() == shards.directory.resolve():
        raise ValueError(f"reshard destination {destination} is the source folder; write to a new folder")
    destination.mkdir(parents=True, exist_ok=True)
    for stale in destination.iterdir():
        if _NAME.match(stale.name):
            raise FileExistsError(f"{destination} already holds head shards ({stale.name}); use an empty folder")
    first = shards.shard(0)
    written = []
    for rank in progress(range(new_world_size), desc="reshard head", unit="shard"):
        start, count = shard_range(shards.num_classes, new_world_size, rank)
        payload = {key: first[key] for key in _COMMON_KEYS}
        payload.update(world_size=new_world_size, rank=rank, class_start=start, num_local_classes=count)
        for key in _ROW_KEYS:
            keep = key not in _OPT_KEYS or shards.has_optimizer
            payload[key] = shards.rows(key, start, count).clone() if keep else None
        path = destination / shard_file_name(rank, new_world_size)
        atomic_torch_save(payload, path)
        written.append(path)
    log.info(
        "resharded head checkpoint %s (%d ranks) -> %s (%d ranks)",
        shards.directory, shards.world_size, destination, new_world_size,
    )
    return written
