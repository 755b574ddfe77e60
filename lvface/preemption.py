"""Preemption: a signal asks the run to stop; the ranks agree at a step boundary, save, and exit 75.

SLURM sends SIGTERM (or the signal asked for with ``--signal``, SIGUSR1 in launch/slurm_64gpu.sh) ahead
of a preemption or the time limit; Kubernetes sends SIGTERM before it kills a pod. A signal handler
here only records the signal: the training loop reads ``StopRequest.requested`` once per step and
puts it into the one all-reduce of the step (lvface/engine.py ``train_step``), so every rank sees the
same answer at the same step, the checkpoint manager saves, and the process exits with
``EXIT_PREEMPTED`` (75, EX_TEMPFAIL: "try again"), which the launch scripts treat as "requeue and
resume".

No rank is orphaned when its launcher dies. ``deepspeed`` (deepspeed.launcher.runner) installs no
signal handler on a single node: SIGTERM kills the runner, and its child deepspeed.launcher.launch
(which would forward the signal to the ranks) runs on with the ranks under it. ``watch_launcher``
therefore watches the process's launcher ancestors (the parent, and the runner above
deepspeed.launcher.launch or torchrun's agent) and raises SIGTERM in this process when one of them is
gone; the parent's death also arrives at once through ``PR_SET_PDEATHSIG`` on Linux.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
from pathlib import Path

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75
"""Exit code of a run that saved because it was asked to stop (EX_TEMPFAIL): requeue and resume."""
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_LAUNCHER_MARKERS = ("deepspeed.launcher", "deepspeed/launcher", "bin/deepspeed", "torch.distributed.run",
                     "torchrun", "torch/distributed/run")


class Preempted(Exception):
    """Raised after the preemption checkpoint is written; the entry point exits with EXIT_PREEMPTED."""

    def __init__(self, signal_name: str, checkpoint):
        super().__init__(f"stopped by {signal_name}; resume from {checkpoint} with checkpoint.resume=auto")
        self.signal_name, self.checkpoint = signal_name, checkpoint


class StopRequest:
    """The signals that ask this process to stop, recorded by handlers that do nothing else."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "a stop request of another rank"

    def _handle(self, signum, frame) -> None:  # async-signal context: record only
        if self.signum is None:
            self.signum = signum

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ...); None when unreadable.
    The name is cut at the last ')' because it may itself hold spaces and parentheses."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent_of(pid: int) -> int:
    fields = _stat_fields(pid)
    try:
        return int(fields[1]) if fields else 0
    except (IndexError, ValueError):
        return 0


def launcher_ancestors(pid: int | None = None) -> list[int]:
    """The parent, and every ancestor above it whose command line is a launcher (deepspeed's runner
    and launch, torchrun), nearest first."""
    pid = os.getpid() if pid is None else pid
    parent = _parent_of(pid)
    chain = [parent] if parent > 1 else []
    ancestor = _parent_of(parent) if chain else 0
    while ancestor > 1 and any(marker in _cmdline(ancestor) for marker in _LAUNCHER_MARKERS):
        chain.append(ancestor)  # the shell or srun above the outermost launcher is not watched
        ancestor = _parent_of(ancestor)
    return chain


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    fields = _stat_fields(pid)
    return not fields or fields[0] != "Z"  # a zombie is dead; unreadable: alive, as os.kill said


def watch_launcher(interval_s: float = 1.0) -> threading.Thread | None:
    """Raise SIGTERM in this process when its parent or a launcher above it exits (see the module
    docstring). Returns the daemon thread, or None for a process without a launcher parent."""
    try:  # the parent's death, at once (Linux)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    watched = launcher_ancestors()
    parent = os.getppid()
    if not watched or parent <= 1:
        return None
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(interval_s):
            gone = [pid for pid in watched if not process_alive(pid)]
            if gone or os.getppid() != parent:
                log.warning("the launcher process %s exited: stopping this rank as if preempted (SIGTERM)",
                            gone[0] if gone else parent)
                os.kill(os.getpid(), signal.SIGTERM)
                return

    thread = threading.Thread(target=watch, name="lvface-launcher-watch", daemon=True)
    thread.stop = stop  # type: ignore[attr-defined]
    thread.start()
    return thread
