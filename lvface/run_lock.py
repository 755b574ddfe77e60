"""One run owns its output folder at a time: `<output_dir>/.lvface.lock` (lvface/run_folder.py).

The lock is a small JSON file (host, pid, start time, and the scheduler's job id when there is one)
created with O_EXCL by rank 0 before anything is written, and removed when the run ends, including
on the preemption path. A second run on the same folder is refused with the holder's description.
A lock left by a process that is dead on this host (a SIGKILL, an out-of-memory kill), or by an
earlier attempt of the same SLURM / Kubernetes job (a requeue, possibly on another node), is stale:
it is reported and taken over. A lock held on another host by another job cannot be checked from
here: the error says which file to remove once that job is known to be gone.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

from lvface.preemption import process_alive
from lvface.run_folder import RunFolder

log = logging.getLogger(__name__)

_JOB_VARIABLES = ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "PET_RUN_ID")


class OutputFolderLocked(RuntimeError):
    pass


def _job_id() -> str | None:
    for name in _JOB_VARIABLES:
        if os.environ.get(name):
            return f"{name}={os.environ[name]}"
    return None


def _describe(holder: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("start_time", 0)))
    job = f", {holder['job']}" if holder.get("job") else ""
    return f"pid {holder.get('pid')} on host {holder.get('host')}{job}, started {started}"


class OutputLock:
    """The output folder's lock; `acquire` on rank 0 only (the trainer broadcasts the outcome)."""

    def __init__(self, output_dir: str | Path):
        self.path = RunFolder(output_dir).lock
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": time.time(), "job": _job_id()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(me, handle)
            self.held = True
            return
        raise OutputFolderLocked(f"{self.path}: could not take the output folder's lock (another run raced for it)")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, json.JSONDecodeError):
            holder = {}
        if not holder:
            log.warning("%s is unreadable (a crash while it was written): taking it over", self.path)
        elif holder.get("job") and holder.get("job") == _job_id():
            log.warning("%s was left by an earlier attempt of this job (%s): taking it over", self.path,
                        _describe(holder))
        elif holder.get("host") == socket.gethostname() and not process_alive(int(holder.get("pid", 0))):
            log.warning("stale lock %s: its run (%s) is no longer alive; taking it over", self.path, _describe(holder))
        elif holder.get("host") == socket.gethostname():
            raise OutputFolderLocked(
                f"train.output_dir={self.path.parent} is in use by another run ({_describe(holder)}); wait for it "
                f"to finish or choose another train.output_dir")
        else:
            raise OutputFolderLocked(
                f"train.output_dir={self.path.parent} is locked by a run on another machine ({_describe(holder)}); "
                f"if that run is gone, delete {self.path}, else choose another train.output_dir")
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    def release(self) -> None:
        if not self.held:
            return
        try:
            holder = json.loads(self.path.read_text())
            if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass
        self.held = False


def hold_output_folder(output_dir: str | Path, rank: int, world_size: int, group) -> OutputLock:
    """Rank 0 takes the output folder's lock; every rank raises if it could not. Collective."""
    lock, error = OutputLock(output_dir), None
    if rank == 0:
        try:
            lock.acquire()
        except (OutputFolderLocked, OSError) as exc:
            error = str(exc)
    if world_size > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0, group=group)
        error = box[0]
    if error:
        raise OutputFolderLocked(error)
    return lock
